"""Sweeps from YAML: what ``resprune sweep [FILE] [overrides]`` runs.

A sweep file names a base pipeline config, one model or a list of models, a dataset, the
grid, the metrics and where results go; see ``resprune/configs/sweeps/default.yaml``
(used when no file is given). Dotlist overrides apply to it
(``model=tiny:qwen2_5_vl base=resprune-qwen2.5-vl grid.budget=[0.1,0.2]``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .ablation import Ablation, AblationError, ResultTable, write_results
from .config import YAML_SUFFIXES, check_keys, excerpt, parse_override, parse_yaml, read_yaml_text, refuse_resolvers
from .errors import ConfigError, suggest
from .runfiles import unique_slug, writable_folder

__all__ = ["SweepConfig", "load_sweep", "run_sweep", "shipped_sweeps", "DEFAULT_SWEEP"]

DEFAULT_SWEEP = "default"


@dataclass
class SweepConfig:
    """The schema of a sweep file."""

    base: str = "resprune-llava15"
    """The pipeline config every cell starts from: a shipped name or a YAML path."""
    model: Any = "tiny:llava"
    """A hub id, a local folder or `tiny:<model_type>`; or a list of them (one study and one table each)."""
    dataset: Optional[str] = None
    """A `.jsonl` / `.csv` file or a `datasets` folder; `null` uses the bundled samples."""
    grid: dict[str, Any] = field(default_factory=dict)
    """Dotted config key -> list of values (`selector`, `budget`, `selector.params.alpha`, `base`, ...); cells are the product."""
    metrics: list[str] = field(default_factory=lambda: ["fidelity", "reconstruction", "flops", "latency"])
    """Names of the metrics to compute (`resprune plugins` lists them; built-ins in the configuration reference)."""
    max_new_tokens: int = 16
    """Tokens generated per example."""
    seed: int = 0
    """Passed to `torch.manual_seed` before every example of every cell, so cells differ only in the grid's values."""
    limit: Optional[int] = None
    """At most this many examples; `null` for all."""
    against: Optional[str] = "residual_energy"
    """The method (a row's method or selector) every other row is tested against at its budget: paired tests (McNemar for per-example correctness, Wilcoxon otherwise), Holm-corrected across the table; `null` for none."""
    out_dir: str = "runs/sweep"
    """Run folder: `sweep.json`, one folder per cell (examples appended as they finish, so a rerun resumes) and `results.jsonl`."""
    device: Optional[str] = None
    """`cpu`, `cuda`, `cuda:1`, ...; `null` leaves the model where it loads (under torchrun: one GPU per process)."""


def _default_path() -> Path:
    return Path(str(resources.files("resprune") / "configs" / "sweeps" / f"{DEFAULT_SWEEP}.yaml"))


def shipped_sweeps() -> dict[str, str]:
    """Names of the sweeps shipped with resprune (``resprune sweep NAME``) -> the first sentence
    of their leading comment."""
    out = {}
    for path in sorted(_default_path().parent.glob("*.yaml")):
        lines = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("# ").strip())
        text = " ".join(lines)
        cut = text.find(". ")
        out[path.stem] = text[: cut + 1] if cut >= 0 else text
    return out


def load_sweep(source: str | Path | None = None, overrides: Iterable[str] = ()) -> SweepConfig:
    """Read a sweep file or shipped sweep name (``None``: the default sweep); apply dotlist overrides.

    Like pipeline files, sweep files may not use resolvers (``${oc.env:NAME}``); overrides
    may (see ``resprune.config``).
    """
    overrides = list(overrides)
    path = _default_path() if source is None else Path(source)
    if source is not None and not path.exists() and (_default_path().parent / f"{source}.yaml").is_file():
        path = _default_path().parent / f"{source}.yaml"  # a shipped sweep by name: `resprune sweep table-iv`
    if not path.exists() and path.suffix not in YAML_SUFFIXES:
        names = list(shipped_sweeps())
        raise AblationError(f"unknown sweep '{source}': neither a sweep file nor a shipped sweep."
                            f"{suggest(str(source), names)} Shipped sweeps (`resprune sweeps`): {', '.join(names)}.")
    valid = [f.name for f in dataclasses.fields(SweepConfig)]
    try:
        raw = parse_yaml(read_yaml_text(path, "sweep"), str(path), "sweep file")
        check_keys(raw, valid, str(path))
        refuse_resolvers(raw, str(path))
        cfg = _merge(OmegaConf.structured(SweepConfig), raw, str(path))
        for item in overrides:
            if "=" not in item:
                raise AblationError(f"override {item!r} must look like key=value (e.g. grid.budget=[64,128])")
            key = item.split("=", 1)[0]
            if key.split(".")[0] not in valid:
                raise AblationError(f"override {item!r}: unknown key '{key.split('.')[0]}'."
                                    f"{suggest(key.split('.')[0], valid)}")
            parse_override(item)  # a value that is not YAML: a ConfigError showing how to quote it
            cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override {excerpt(item)!r}")
        spec: SweepConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise AblationError(f"{path}: {getattr(exc, 'full_key', '') or ''}: {str(exc).splitlines()[0]}") from None
    except ConfigError as exc:
        raise AblationError(str(exc)) from None
    _check(spec, f"{path}{' with overrides' if overrides else ''}")
    return spec


def _merge(cfg: Any, other: Any, label: str) -> Any:
    for key in ("grid", "metrics"):  # shapes OmegaConf reports only as 'incompatible container types'
        value = other.get(key) if isinstance(other, DictConfig) else None
        want = DictConfig if key == "grid" else ListConfig
        if value is not None and not isinstance(value, want):
            example = "{budget: [64, 128], selector: [residual_energy, divprune]}" if key == "grid" \
                else "[fidelity, flops]"
            raise AblationError(f"{label}: {key}: expected a {'mapping' if key == 'grid' else 'list'} such as "
                                f"{example}, got {excerpt(repr(OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value))}.")
    try:
        return OmegaConf.merge(cfg, other)
    except (TypeError, ValueError) as exc:
        raise AblationError(f"{label}: {excerpt(exc, 200)}") from None


def _check(spec: SweepConfig, label: str) -> None:
    """Values the schema's types admit but a sweep cannot run with."""
    if spec.max_new_tokens < 1:
        raise AblationError(f"{label}: max_new_tokens must be >= 1, got {spec.max_new_tokens}.")
    if spec.limit is not None and spec.limit < 1:
        raise AblationError(f"{label}: limit must be >= 1 (or null for every record), got {spec.limit}.")
    models = spec.model if isinstance(spec.model, list) else [spec.model]
    if not models or not all(isinstance(m, str) and m for m in models):
        raise AblationError(f"{label}: model must be a hub id, a folder or tiny:<model_type>, or a list of them; "
                            f"got {excerpt(spec.model)!r}.")


def run_sweep(spec: SweepConfig, *, out_dir: str | Path | None = None, progress: bool = True,
              print_fn: Any = print) -> ResultTable:
    """Run the sweep on every model of ``spec`` (one after another); write results and return them."""
    from .models import load_model

    import os

    import torch

    models = spec.model if isinstance(spec.model, list) else [spec.model]
    root = Path(out_dir or spec.out_dir)
    device = spec.device
    if device is None and torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per process
    writable_folder(root, "run folder")  # before any model is loaded
    studies = []
    for name in models:  # build and validate every study before running any
        model, processor = load_model(str(name), device=device)
        studies.append((name, Ablation(spec.base, spec.grid, model=model, processor=processor, dataset=spec.dataset,
                                       metrics=spec.metrics, model_name=str(name), max_new_tokens=spec.max_new_tokens,
                                       seed=spec.seed, limit=spec.limit, progress=progress, against=spec.against)))
    folders = [root if len(studies) == 1 else root / unique_slug(str(name)) for name, _ in studies]  # org/m, org:m
    for folder, (_, study) in zip(folders, studies):
        study.check_out_dir(folder)  # every output checked before the first cell runs
    table = ResultTable()
    for folder, (name, study) in zip(folders, studies):
        if study.rank == 0:
            print_fn(f"sweep: {len(study.cells)} cells x {len(study.records)} examples on {name} -> {folder}")
        table.extend(study.run(folder))
    if len(studies) > 1 and studies[0][1].rank == 0:
        write_results(root / "results.jsonl", table)
    return table
