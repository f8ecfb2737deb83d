"""Ablation studies: sweep strategies, budgets and hyperparameters over a dataset.

>>> study = resprune.Ablation(base="resprune-llava15",
...     grid={"selector": ["residual_energy", "divprune"], "budget": [64, 128]},
...     model=model, processor=processor, metrics=["fidelity", "flops"])
>>> table = study.run(out_dir="runs/llava15")

Everything that can be wrong with a grid (unknown keys, values a strategy rejects,
pipelines the backbone cannot run) fails in the constructor, naming the cell, before any
model work. A grid key that does not apply to a cell's selector (``alpha`` for
``divprune``) is dropped for that cell; the duplicate cells this makes are skipped with
the reason, and the report lists them.

A run folder holds, per cell, the resolved config, its metadata (plugin versions, seed,
device, timestamps) and one line per finished example, so re-running skips what is done
and an interruption loses at most the example in progress. The unpruned model's outputs
are computed once per example and shared by every cell. Under ``accelerate launch`` the
examples are sharded across processes and the results merged.

What is reused is keyed by everything that changes its numbers: a cell's folder by its
pipeline config, the model (name, config, dtype, device type), the generation settings,
the metric set and the resprune version; an example line and a reference output by the
content of its record (image bytes included). Rerunning into the same folder with another
spec recomputes exactly what the change affects. Files are written atomically or
append-only (``resprune.runfiles``); a lock refuses a second run into the same folder;
nothing in a run folder is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import operator
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from . import runfiles
from .comparisons import FULL_EXAMPLES, example_line, intervals, paired_tests, relative_interval
from .config import load_config, selector_label, to_yaml
from .costs import llm_dims, vision_dims
from .data import describe_source, image_digest_of, load_records, open_image, record_digest
from .errors import ConfigError, MissingDependencyError, ResPruneError, UnknownStrategyError, suggest
from .metrics import Example, Metric, Reference, finite_number
from .models import chat_inputs
from .pipeline import Pipeline
from .plugins import get_host
from .prompts import tokenizer_of
from .timing import clock
from ._version import __version__

__all__ = ["Ablation", "AblationError", "Cell", "ResultTable", "expand_grid"]


class AblationError(ConfigError):
    """An invalid ablation grid or setup, found before any model work."""


@dataclasses.dataclass
class Cell:
    """One combination of the grid.

    Attributes:
        id: stable short hash of the resolved config and of the run identity that
            ``expand_grid`` was given (model, generation settings, metrics...): the cell's
            folder name in the run.
        label: readable description (``dpp budget=64``).
        method: the selector plus the non-budget grid values that vary.
        budget: the cell's budget.
        params: the grid values applied to this cell (dotted keys).
        config: the resolved pipeline config (``None`` for a skipped cell).
        skip: why the cell is skipped, if it is.
    """

    id: str
    label: str
    method: str
    budget: Any
    params: dict[str, Any]
    config: DictConfig | None
    skip: str | None = None


class ResultTable(list):
    """Rows of results (one dict per cell, plus one ``full`` row per model).

    A row holds ``model``, ``cell`` (its id), ``label``, ``method``, ``selector`` (the input
    stage's selector, or ``topk@2``-style for stages inside the LLM), ``budget``, ``params``
    (the grid values applied), ``status`` (``done`` / ``skipped`` / ``failed``), ``reason``,
    ``examples``, ``metrics`` (``{"fidelity.kl": ...}``, means over the examples),
    ``intervals`` (``{"fidelity.kl": [low, high]}``: the 95 % interval of each mean over the
    examples, ``resprune.stats``), ``rel`` (the paper's relative score, or ``None``) with
    ``rel_interval`` (its paired 95 % interval), and ``tests`` (``{"against": name, "p": {key:
    p}}``: Holm-corrected paired tests against the reference method, ``resprune.comparisons``).
    """

    @classmethod
    def load(cls, run_dir: str | Path) -> ResultTable:
        """The results of a run folder written by ``resprune sweep`` / ``Ablation.run`` (or of a folder
        of lmms-eval results): ``ResultTable.load("runs/sweep").to_pandas()``."""
        from .report import load_results

        return cls(load_results(run_dir))

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame``, one row per cell: the flat columns of
        ``resprune.report.flat_table`` (``selector``, ``budget``, each grid parameter, each metric
        key such as ``fidelity.kl``) and ``row``, the full result row. ``budget`` holds ints
        (pandas' nullable ``Int64``: the full row has none) when every budget is an int. Needs
        pandas (``pip install "resprune[pandas]"``)."""
        try:
            import pandas as pd
        except ImportError:
            raise MissingDependencyError('ResultTable.to_pandas needs pandas: pip install "resprune[pandas]"') \
                from None
        from .report import flat_table

        columns, records = flat_table(list(self))
        frame = pd.DataFrame.from_records(records, columns=columns)
        budgets = [r["budget"] for r in records if r["budget"] is not None]
        if budgets and all(isinstance(b, int) and not isinstance(b, bool) for b in budgets):
            frame["budget"] = frame["budget"].astype("Int64")  # 16, not 16.0 beside the full row's missing one
        elif budgets:
            frame["budget"] = pd.Series([r["budget"] for r in records], dtype=object)  # 16 and 0.25 stay apart
        frame["row"] = list(self)
        return frame

    def to_markdown(self, metrics: list[str] | None = None) -> str:
        from .report import results_table

        models = sorted({r["model"] for r in self})
        return "\n\n".join(results_table(list(self), metrics=metrics, model=m) for m in models)


# --- the grid -------------------------------------------------------------------------


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _selector_params(name: str | None) -> set[str]:
    if name is None:
        return set()
    cls = get_host().selectors.get(name)
    return {f.name for f in dataclasses.fields(cls.Params)}


def expand_grid(base: Any, grid: Mapping[str, Any], identity: Mapping[str, Any] | None = None) -> list[Cell]:
    """Every cell of ``grid`` over ``base``, validated (raises ``AblationError``).

    The grid key ``base`` varies the config itself (e.g. the settings of the paper's
    Table IV are separate shipped configs); its values then label the rows. ``identity``
    (what else changes a cell's numbers: model, generation settings...) enters the ids.
    """
    if not isinstance(grid, Mapping) or not grid:
        got = "an empty mapping" if isinstance(grid, Mapping) else f"a {type(grid).__name__}"
        raise AblationError(f"grid must be a non-empty mapping of config keys to lists of values "
                            f"(e.g. {{budget: [64, 128]}}), got {got}.")
    for key in grid:
        if not isinstance(key, str):
            raise AblationError(f"grid keys must be dotted config keys (strings), got {key!r}.")
    values = {k: (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in grid.items()}
    for key, vals in values.items():
        if not vals:
            raise AblationError(f"grid key '{key}' has no values.")
    bases = values.pop("base", [base])
    cells: list[Cell] = []
    seen: dict[str, Cell] = {}
    salt = json.dumps(dict(identity or {}), sort_keys=True, default=str)
    for b in bases:
        cells += _expand_one(b, values, seen, name=_base_name(b) if len(bases) > 1 else None, salt=salt)
    return cells


def _base_name(base: Any) -> str:
    return Path(base).stem if isinstance(base, (str, Path)) else "<dict>"


def _expand_one(base: Any, values: dict[str, list[Any]], seen: dict[str, Cell], name: str | None,
                salt: str) -> list[Cell]:
    try:
        base_cfg = load_config(base)
    except ConfigError as exc:
        raise AblationError(f"base config: {exc}") from None
    own = base_cfg.selector.name  # None: no input stage (the config prunes inside the LLM)
    selectors = [str(s) for s in values["selector"]] if "selector" in values else [own] if own else []
    for sel in selectors:
        try:
            get_host().selectors.get(sel)
        except UnknownStrategyError as exc:
            raise AblationError(f"grid key 'selector': {exc}") from None
    for key in values:
        if key.startswith("selector.params."):
            param = key[len("selector.params."):]
            have = [s for s in selectors if param in _selector_params(s)]
            if not have:
                known = sorted(set().union(*(_selector_params(s) for s in selectors)))
                raise AblationError(f"grid key '{key}': no selector in this grid ({', '.join(selectors)}) has "
                                    f"parameter '{param}'.{suggest(param, known)} Their parameters: {', '.join(known)}.")
    varying = [k for k in values if k not in ("budget", "selector") and len(values[k]) > 1]
    order = sorted(values, key=lambda k: (k != "selector", k))  # the selector first: it resets its params
    cells: list[Cell] = []
    for combo in itertools.product(*(values[k] for k in order)):
        params = dict(zip(order, combo))
        selector = str(params["selector"]) if "selector" in params else own
        dropped = [k for k in params if k.startswith("selector.params.")
                   and k[len("selector.params."):] not in _selector_params(selector)]
        applied = {k: v for k, v in params.items() if k not in dropped}
        shown = {k: v for k, v in applied.items() if k in varying}
        head = [name] if name else []
        if not name or "selector" in values:
            head.append(selector or selector_label(base_cfg))
        method = " ".join(head + [f"{_short(k)}={v}" for k, v in shown.items()])
        budget = applied.get("budget", base_cfg.budget)
        label = f"{method} budget={budget}"
        if name:
            params = {"base": name, **params}
        try:
            cfg = load_config(base, applied)  # the values as given: never re-parsed from text
        except ConfigError as exc:
            raise AblationError(f"cell '{label}' ({_fmt(params)}): {exc}") from None
        key = to_yaml(cfg)
        versions = plugin_versions(_strategies(cfg))  # an upgraded third-party plugin: new cells
        cell_id = hashlib.sha1((key + salt + (json.dumps(versions, sort_keys=True) if versions else "")).encode()
                               ).hexdigest()[:10]
        if key in seen:
            first = seen[key]
            why = (f"selector '{selector}' has no parameter {', '.join(repr(_short(k)) for k in dropped)}; "
                   f"it runs once as '{first.label}'") if dropped else f"same config as '{first.label}'"
            cells.append(Cell(f"{cell_id}-dup{len(cells)}", f"{label} ({_fmt(params)})", method, budget,
                              params, None, skip=why))
            continue
        cell = Cell(cell_id, label, method, budget, {**({"base": name} if name else {}), **applied}, cfg)
        seen[key] = cell
        cells.append(cell)
    return cells


def _strategies(cfg: DictConfig) -> list[tuple[str, str]]:
    """``(registry, name)`` of every scorer, selector and merger a config runs."""
    out: list[tuple[str, str]] = []
    for stage in [cfg, *cfg.vision_stages, *cfg.stages]:
        if stage.selector.name:
            out.append(("selectors", stage.selector.name))
        out += [("scorers", sc.name) for sc in stage.scorers]
        if stage.merger:
            out.append(("mergers", stage.merger.name))
    return out


def plugin_versions(used: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``{plugin: "distribution version"}`` of the third-party plugins providing ``used``
    (``(registry, name)`` pairs, e.g. ``("selectors", "mine")``; ``("injectors", model_type)`` for
    the injector of a model type). Built-in strategies are covered by resprune's own version."""
    host = get_host()
    info = {p["plugin"]: p for p in host.list_plugins()}
    out: dict[str, str] = {}
    for registry, name in used:
        try:
            entry = host.injector_entry(name) if registry == "injectors" else getattr(host, registry).entry(name)
        except UnknownStrategyError:
            continue
        if entry is None:
            continue
        plugin = info.get(entry.plugin, {})
        if plugin.get("distribution") != "resprune":
            out[entry.plugin] = f"{plugin.get('distribution') or '-'} {plugin.get('version') or '-'}"
    return dict(sorted(out.items()))


def _fmt(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


# --- the study --------------------------------------------------------------------------


class Ablation:
    """A sweep of pipeline configs over a dataset on one model.

    Args:
        base: a shipped config name, YAML path or mapping that every cell starts from.
        grid: dotted config keys -> lists of values (``selector``, ``budget``,
            ``selector.params.alpha``, ``scorers.1.params.reduce``, ``backbone.params.scope``).
        model: a supported Hugging Face LVLM.
        processor: its processor (for prompts, and for text-conditioned scorers).
        dataset: see ``resprune.data.load_records`` (``None``: the bundled sample set).
        metrics: registered metric names.
        model_name: how the model is named in results (default: its class and config).
        max_new_tokens: length of the greedy answers (>= 1).
        seed: set before every example of every cell.
        limit: use at most this many examples (>= 1; ``None``: all).
        progress: show progress bars and a line per finished cell.
        against: the method the paired tests compare every other row with, at the same budget (a
            row's ``method`` or ``selector``; default ResPrune's selector ``residual_energy``;
            ``None``: no tests). A row compared gets ``tests``: ``{"against": name, "p": {metric:
            p}}``, p-values Holm-corrected across the rows of the table (``resprune.stats``).
    """

    def __init__(self, base: Any, grid: Mapping[str, Any], *, model: Any, processor: Any = None,
                 dataset: Any = None, metrics: Sequence[str] = ("fidelity", "reconstruction", "flops", "latency"),
                 model_name: str | None = None, max_new_tokens: int = 16, seed: int = 0, limit: int | None = None,
                 progress: bool = True, against: str | None = "residual_energy") -> None:
        self.base, self.grid = base, dict(grid) if isinstance(grid, Mapping) else grid
        self.model, self.processor = model, processor
        self.model_name = model_name or f"{type(model).__name__}:{getattr(model.config, '_name_or_path', '') or 'random'}"
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.seed, self.progress = _int("seed", seed), bool(progress)
        if against is not None and not isinstance(against, str):
            raise AblationError(f"against must be a method or selector name (or None), got {against!r}.")
        self.against = against
        if isinstance(metrics, str) or not isinstance(metrics, Sequence):
            raise AblationError(f"metrics must be a list of metric names, got {metrics!r}.")
        self.metrics: dict[str, Metric] = {}
        for name in metrics:
            try:
                self.metrics[name] = get_host().metrics.get(name)({})
            except UnknownStrategyError as exc:
                raise AblationError(f"metrics: {exc}") from None
        self.needs = frozenset().union(*(m.needs for m in self.metrics.values()))
        self.identity = self._identity()
        self.cells = expand_grid(base, self.grid, self.identity)
        self.pipelines: dict[str, Pipeline] = {}
        injector_cls = get_host().injector_for(getattr(model.config, "model_type", None), model=model)
        for cell in self.cells:
            if cell.skip:
                continue
            pipe = Pipeline.from_config(cell.config)
            try:
                injector_cls(pipe.backbone_params(injector_cls)).check_pipeline(pipe, processor, None)
            except ResPruneError as exc:
                raise AblationError(f"cell '{cell.label}': {exc}") from None
            self.pipelines[cell.id] = pipe
        self.dataset_source = describe_source(dataset)
        self.records = load_records(dataset, limit=limit)
        if not self.records:
            raise AblationError("the dataset has no records.")
        images = [image_digest_of(r["image"]) for r in self.records]  # each image read once
        self.record_keys = [record_digest(r, image_digest=h) for r, h in zip(self.records, images)]
        self.prompt_keys = [record_digest(r, ("image", "question"), image_digest=h) for r, h in zip(self.records, images)]
        self.dims = llm_dims(model.config)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.vocab: int | None = int(head.weight.shape[0]) if getattr(head, "weight", None) is not None else None
        self.vision_dims = vision_dims(model.config) if getattr(model.config, "vision_config", None) else None
        self.rank, self.world, self._state = _distributed()

    def _identity(self) -> dict[str, Any]:
        """Everything besides the pipeline config that changes a cell's numbers (the versions of
        third-party plugins providing the metrics and the injector included)."""
        config = getattr(self.model.config, "to_dict", dict)()
        versions = plugin_versions([("metrics", m) for m in self.metrics]
                                   + [("injectors", getattr(self.model.config, "model_type", None))])
        return {"model": self.model_name,
                "model_config": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16],
                "dtype": str(getattr(self.model, "dtype", "")), "device": self.model.device.type,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed, "metrics": sorted(self.metrics),
                "resprune": __version__, **({"plugins": versions} if versions else {})}

    # --- running -----------------------------------------------------------------------

    def run(self, out_dir: str | Path) -> ResultTable:
        """Run every cell not finished yet in ``out_dir``; return the results of all.

        Raises ``RunLockedError`` if another process is writing ``out_dir``.
        """
        out = Path(out_dir)
        self.check_out_dir(out)
        lock = runfiles.RunLock(out)
        try:
            self._lock(lock)
            return self._run(out)
        finally:
            lock.release()

    def check_out_dir(self, out_dir: str | Path) -> None:
        """Check, before any model work, that the run folder and every folder of it this run writes
        (``reference/``, each cell's) can be written, and that nothing in it is a symlink leading
        outside it; ``OutputPathError`` / ``RunFileError`` naming the path otherwise."""
        out = runfiles.writable_folder(out_dir, "run folder")
        for name in ("results.jsonl", "sweep.json", FULL_EXAMPLES, "reference", "cells", runfiles.RunLock.FILENAME):
            runfiles.check_inside(out, out / name)
        folders = [(out / "reference", "reference folder")]
        folders += [(out / "cells" / c.id, f"folder of cell '{c.label}'") for c in self.cells if not c.skip]
        for folder, what in folders:
            runfiles.check_inside(out, folder)
            if os.path.lexists(folder):
                runfiles.writable_folder(folder, what)
                for path in folder.iterdir():
                    runfiles.check_inside(out, path)

    def _lock(self, lock: runfiles.RunLock) -> None:
        """Rank 0 locks the folder (the other ranks own their files); every rank learns if it failed."""
        error: runfiles.RunLockedError | None = None
        if self.rank == 0:
            try:
                lock.acquire()
            except runfiles.RunLockedError as exc:
                error = exc
        if self._state is not None:
            flag = torch.tensor([0 if error else 1])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self._state)
            if not int(flag) and error is None:
                error = runfiles.RunLockedError(f"run folder '{lock.folder}' is being written by another process.")
        if error is not None:
            raise error

    def _run(self, out: Path) -> ResultTable:
        if self.world == 1:  # the only writer (the lock is held): temporary files left by a killed run go
            for tmp in out.rglob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        self._write_spec(out)
        mine = [i for i in range(len(self.records)) if i % self.world == self.rank]
        references = self._references(out, mine)  # also the full row (accuracy, FLOPs of the unpruned model)
        quiet = not self.progress or self.rank != 0
        bar = _bar(total=len(self.cells), desc="cells", disable=quiet)
        for n, cell in enumerate(self.cells, 1):
            if not cell.skip:
                self._run_cell(out, cell, mine, references)
            self._barrier()
            if self.rank == 0:
                row = self._summarise(out, cell)
                if not quiet:
                    bar.write(f"[{n}/{len(self.cells)}] {_one_line(row)}")
            bar.update(1)
        bar.close()
        self._barrier()
        full_lines = self._full_examples(out)
        table = self._collect(out, full_lines)
        if self.rank == 0:
            runfiles.write_atomic(out / FULL_EXAMPLES, "".join(
                json.dumps({"index": i, "record": self.record_keys[i], "metrics": full_lines[i]}) + "\n"
                for i in sorted(full_lines)))  # the unpruned model per example: `resprune report --against/--split`
            write_results(out / "results.jsonl", table)
        return table

    def _write_spec(self, out: Path) -> None:
        if self.rank != 0:
            return
        spec = {"base": self.base if isinstance(self.base, str) else OmegaConf.to_container(OmegaConf.create(
                    dict(self.base))), "grid": self.grid, "model": self.model_name, "dataset": self.dataset_source,
                "examples": len(self.records), "identity": self.identity,
                "dataset_digest": hashlib.sha256("".join(self.record_keys).encode()).hexdigest()[:16],
                "metrics": list(self.metrics), "max_new_tokens": self.max_new_tokens, "seed": self.seed,
                "cells": [{"id": c.id, "label": c.label, "skip": c.skip} for c in self.cells]}
        runfiles.write_atomic(out / "sweep.json", json.dumps(spec, indent=2, default=str))

    def _inputs(self, record: Mapping[str, Any], pipeline: Pipeline | None = None) -> Any:
        """The model inputs of ``record``; its image as ``pipeline`` hands it to the processor if given."""
        images = [open_image(record["image"])]
        if pipeline is not None:
            images = pipeline.prepare_images(images, self.processor)  # downsampling resizes before the processor
        return chat_inputs(self.processor, images, [str(record["question"])], device=self.model.device)

    def _unresized_tower(self, attached: Any, inputs: Any) -> tuple[int, int] | None:
        """``(tokens, tiles)`` the vision tower would run on for the image as given (one more tower
        forward, only when ``vision_flops`` is measured)."""
        if "vision_flops" not in self.metrics or self.vision_dims is None:
            return None
        with torch.no_grad():
            (image,) = attached.injector.encode(self.model, inputs, frozenset())
        return (image.tower_schedule[0][1] * image.tower_tiles, image.tower_tiles) if image.tower_schedule else None

    def _generate(self, inputs: Any) -> tuple[str, torch.Tensor, float, float | None]:
        device = self.model.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = clock(device)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)
        total_ms = (clock(device) - start) * 1e3
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        tok = tokenizer_of(self.processor)
        answer = tok.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        return answer, out.logits[0][0].float().cpu(), total_ms, peak

    def _prefill_ms(self, inputs: Any) -> float:
        device = self.model.device
        self.model(**inputs)  # warm-up
        start = clock(device)
        self.model(**inputs)
        return (clock(device) - start) * 1e3

    def _reference_key(self, i: int) -> dict[str, Any]:
        """What the unpruned model's outputs on example ``i`` depend on."""
        return {**{k: self.identity[k] for k in ("model", "model_config", "dtype", "device", "max_new_tokens",
                                                  "seed")},
                "latency": "latency" in self.needs, "prompt": self.prompt_keys[i]}

    def _reference_path(self, out: Path, key: Mapping[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return out / "reference" / f"{digest}.safetensors"

    def _references(self, out: Path, mine: list[int]) -> dict[int, Reference]:
        folder = out / "reference"
        folder.mkdir(exist_ok=True)
        refuse_pickles(folder)
        refs: dict[int, Reference] = {}
        bar = _bar(total=len(mine), desc="unpruned model", disable=not self.progress or self.rank != 0, leave=False)
        for i in mine:
            key = self._reference_key(i)
            path = self._reference_path(out, key)
            saved = load_reference(path, key, vocab=self.vocab)
            if saved is not None:
                refs[i] = saved
            else:
                torch.manual_seed(self.seed)
                inputs = self._inputs(self.records[i])
                with torch.no_grad():
                    answer, logits, _, peak = self._generate(inputs)
                    prefill = self._prefill_ms(inputs) if "latency" in self.needs else None
                refs[i] = Reference(answer, logits, int(inputs["attention_mask"].sum()), prefill, peak)
                save_reference(path, key, refs[i])
            bar.update(1)
        bar.close()
        return refs

    def _run_cell(self, out: Path, cell: Cell, mine: list[int], references: dict[int, Reference]) -> None:
        folder = out / "cells" / cell.id
        folder.mkdir(parents=True, exist_ok=True)
        meta_file = folder / f"meta.rank{self.rank}.json"
        done_file = folder / f"examples.rank{self.rank}.jsonl"
        done = set(self._example_lines(done_file, repair=True))  # of this run's records only
        todo = [i for i in mine if i not in done]
        if not todo and (runfiles.read_json(meta_file) or {}).get("status") == "done":
            return
        if self.rank == 0:
            runfiles.write_atomic(folder / "config.yaml", to_yaml(cell.config))
        meta = {"cell": cell.id, "label": cell.label, "params": cell.params, "model": self.model_name,
                "identity": self.identity, "seed": self.seed, "device": str(self.model.device),
                "host": platform.node(), "torch": torch.__version__, "plugins": _plugin_versions(),
                "rank": self.rank, "world": self.world, "started": _stamp()}
        pipe = self.pipelines[cell.id]
        bar = _bar(total=len(todo), desc=cell.label[:40], disable=not self.progress or self.rank != 0, leave=False)
        try:
            with pipe.attach(self.model, self.processor) as attached, torch.no_grad():
                attached.profile = "latency" in self.needs
                for i in todo:
                    values = self._example(attached, self.records[i], references.get(i))
                    runfiles.append_jsonl(done_file, {"index": i, "record": self.record_keys[i], "metrics": values})
                    bar.update(1)
            meta["status"] = "done"
        except Exception as exc:  # noqa: BLE001 - a failing cell is recorded; the sweep goes on
            meta["status"] = "failed"
            meta["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            bar.close()
        meta["finished"] = _stamp()
        runfiles.write_atomic(meta_file, json.dumps(meta, indent=2, default=str))

    def _example_lines(self, path: Path, *, repair: bool = False) -> dict[int, dict[str, float]]:
        """index -> metrics of the lines of ``path`` that belong to this run's records."""
        out: dict[int, dict[str, float]] = {}
        for n, line in runfiles.read_jsonl(path, repair=repair):
            i, record, metrics = example_line(path, n, line)
            if 0 <= i < len(self.records) and record == self.record_keys[i]:
                out[i] = metrics  # a later line of the same example replaces an earlier one
        return out

    def _example(self, attached: Any, record: Mapping[str, Any], reference: Reference | None) -> dict[str, float]:
        torch.manual_seed(self.seed)
        resized = attached.pipeline.resizes_images
        inputs = self._inputs(record, attached.pipeline)
        before = self._inputs(record) if resized else inputs  # FLOPs are counted against the image as given
        answer, logits, total_ms, peak = self._generate(inputs)
        batch = attached.last
        timings: dict[str, float] = {}
        if "latency" in self.needs:
            timings = {"selection_ms": float(batch.prune_ms or 0.0), "prefill_ms": self._prefill_ms(inputs),
                       "total_ms": total_ms}
        example = Example(record=dict(record), answer=answer, first_logits=logits, selections=batch.selections,
                          tokens_before=int(before["attention_mask"].sum()),
                          tokens_after=int(batch.attention_mask.sum()), dims=self.dims,
                          # a resized image's tokens are not the ones it was pruned from: no reconstruction
                          features=[f.detach().float().cpu() for f in batch.features]
                          if "features" in self.needs and not resized else [], timings=timings, peak_mib=peak, reference=reference,
                          token_schedule=batch.token_schedule if batch.stages else None, stages=batch.stages,
                          tower_schedule=batch.tower_schedule, tower_tiles=batch.tower_tiles,
                          unresized_tower=self._unresized_tower(attached, before) if resized else None,
                          vision_dims=self.vision_dims)
        values: dict[str, float] = {}
        for name, metric in self.metrics.items():
            for key, value in metric.compute(example).items():
                values[f"{name}.{key}"] = float(value)
        return values

    # --- results -------------------------------------------------------------------------

    def _summarise(self, out: Path, cell: Cell) -> dict[str, Any]:
        row = self._row(out, cell)
        if not cell.skip:
            runfiles.write_atomic(out / "cells" / cell.id / "summary.json", json.dumps(row, indent=2, default=str))
        return row

    def _row(self, out: Path, cell: Cell, lines: dict[int, dict[str, float]] | None = None) -> dict[str, Any]:
        """A cell's result row; ``lines``: its examples when the caller has read them already."""
        selector = None if cell.config is None else selector_label(cell.config)
        row: dict[str, Any] = {"cell": cell.id, "label": cell.label, "model": self.model_name, "method": cell.method,
                               "selector": selector or cell.params.get("selector", cell.method),
                               "budget": cell.budget, "params": cell.params, "status": "skipped", "reason": cell.skip,
                               "examples": 0, "metrics": {}, "rel": None}
        if cell.skip:
            return row
        folder = out / "cells" / cell.id
        metas = [m for p in sorted(folder.glob("meta.rank*.json")) if (m := runfiles.read_json(p)) is not None]
        failed = [m for m in metas if m.get("status") == "failed"]
        lines = self._cell_examples(out, cell) if lines is None else lines
        row["examples"] = len(lines)
        row["metrics"] = _mean(lines[i] for i in sorted(lines))
        row["intervals"] = intervals([lines[i] for i in sorted(lines)], seed=self.seed)
        if failed:
            row.update(status="failed", reason=failed[0].get("error", "no error recorded"))
        elif row["examples"] >= len(self.records):
            row["status"] = "done"
        else:
            row.update(status="failed", reason=f"only {row['examples']} of {len(self.records)} examples finished")
        return row

    def _cell_examples(self, out: Path, cell: Cell) -> dict[int, dict[str, float]]:
        """Example index -> metrics of a cell, each example once, whichever rank or run wrote it."""
        lines: dict[int, dict[str, float]] = {}
        for path in sorted((out / "cells" / cell.id).glob("examples.rank*.jsonl")):
            lines.update(self._example_lines(path))
        return lines

    def _full_examples(self, out: Path) -> dict[int, dict[str, float]]:
        """Example index -> the unpruned model's metrics, for the examples whose reference exists."""
        refuse_pickles(out / "reference")
        values: dict[int, dict[str, float]] = {}
        for i, record in enumerate(self.records):
            key = self._reference_key(i)
            ref = load_reference(self._reference_path(out, key), key, vocab=self.vocab)
            if ref is None:
                continue
            per: dict[str, float] = {}
            for name, metric in self.metrics.items():
                for k, value in metric.baseline(record, ref, self.dims).items():
                    per[f"{name}.{k}"] = float(value)
            values[i] = per
        return values

    def _full_row(self, out: Path, lines: dict[int, dict[str, float]]) -> dict[str, Any]:
        values = [lines[i] for i in sorted(lines)]
        return {"cell": "full", "label": "full (unpruned)", "model": self.model_name, "method": "full",
                "selector": None, "budget": None, "params": {}, "status": "done", "reason": None,
                "examples": len(values),
                "metrics": _mean(values), "intervals": intervals(values, seed=self.seed), "rel": 1.0}

    def collect(self, out_dir: str | Path) -> ResultTable:
        """The results in ``out_dir`` (finished or not) as a ``ResultTable``."""
        return self._collect(Path(out_dir), self._full_examples(Path(out_dir)))

    def _collect(self, out: Path, full_lines: dict[int, dict[str, float]]) -> ResultTable:
        full = self._full_row(out, full_lines)
        examples = [{} if cell.skip else self._cell_examples(out, cell) for cell in self.cells]  # read once
        rows = [full] + [self._row(out, cell, lines) for cell, lines in zip(self.cells, examples)]
        relative = sorted({f"{n}.{k}" for n, m in self.metrics.items() for k in m.relative})
        for row, lines in zip(rows[1:], examples):
            keys = [key for key in relative if key in row["metrics"] and full["metrics"].get(key)]
            row["rel"] = sum(row["metrics"][key] / full["metrics"][key] for key in keys) / len(keys) if keys else None
            if keys:
                row["rel_interval"] = relative_interval(dict(sorted(lines.items())), full_lines, keys, seed=self.seed)
        if not any(key in full["metrics"] and full["metrics"][key] for key in relative):
            full["rel"] = None
        if self.against is not None:
            paired_tests(rows, [full_lines] + examples, self.against)
        return ResultTable(rows)

    # --- processes ------------------------------------------------------------------------

    def _barrier(self) -> None:
        if self._state is not None:
            torch.distributed.barrier(group=self._state)


def _distributed() -> tuple[int, int, Any]:
    """(rank, world size, process group) under ``accelerate launch`` / ``torchrun``; (0, 1, None) alone.

    Only barriers are needed (results go through the run folder), so the group is gloo,
    on CPU and GPU machines alike.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), dist.group.WORLD


def _int(name: str, value: Any) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise AblationError(f"{name} must be an int, got {value!r}.") from None


def _positive_int(name: str, value: Any) -> int:
    value = _int(name, value)
    if value < 1:
        raise AblationError(f"{name} must be >= 1, got {value}.")
    return value


def write_results(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write result rows as ``results.jsonl``, atomically (readers see the old file or the new one)."""
    runfiles.write_atomic(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


# --- the unpruned model's outputs: safetensors (tensors + a JSON header), never pickle ----------


def refuse_pickles(folder: Path) -> None:
    """Refuse a run folder holding pickled reference files: loading them could run code."""
    pickles = sorted(folder.glob("*.pt")) if folder.is_dir() else []
    if pickles:
        raise runfiles.RunFileError(
            f"{pickles[0]}{f' (and {len(pickles) - 1} more)' if len(pickles) > 1 else ''}: pickle files in a run "
            f"folder are never loaded (unpickling can run arbitrary code). It was written by an older resprune or "
            f"placed there by someone else; delete {folder}/*.pt (the unpruned outputs are recomputed) or start a "
            f"new folder.")


def save_reference(path: Path, key: Mapping[str, Any], ref: Reference) -> None:
    """Store one example's unpruned outputs: the logits as a tensor, the rest as JSON metadata."""
    from safetensors.torch import save_file

    meta = {"key": json.dumps(dict(key), sort_keys=True),
            "reference": json.dumps({"answer": ref.answer, "tokens": ref.tokens, "prefill_ms": ref.prefill_ms,
                                     "peak_mib": ref.peak_mib})}
    logits = ref.first_logits.detach().float().cpu().contiguous()
    runfiles.replace_with(path, lambda tmp: save_file({"first_logits": logits}, str(tmp), metadata=meta))


def load_reference(path: Path, key: Mapping[str, Any], *, vocab: int | None = None) -> Reference | None:
    """The stored outputs for ``key``; ``None`` if absent or for another key. A file that is damaged
    or holds what ``save_reference`` never writes (logits that are not one finite float32 row of
    ``vocab`` values, a token count that is not a positive int) is warned about and ``None``: the
    caller recomputes it."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("key") != json.dumps(dict(key), sort_keys=True):
                return None
            info = json.loads(meta["reference"])
            logits = fh.get_tensor("first_logits")
    except Exception as exc:  # noqa: BLE001 - a damaged file (truncated, empty, edited) is recomputed
        runfiles.warn_once(path, f"ignored a damaged reference file ({type(exc).__name__}); it is recomputed")
        return None
    problem = _reference_problem(info, logits, vocab)
    if problem:
        runfiles.warn_once(path, f"ignored a reference file whose {problem}; it is recomputed")
        return None
    return Reference(info["answer"], logits, info["tokens"], info.get("prefill_ms"), info.get("peak_mib"))


def _reference_problem(info: Any, logits: torch.Tensor, vocab: int | None) -> str | None:
    """What is wrong with a stored reference (``None``: nothing)."""
    if logits.dtype != torch.float32:
        return f"logits are {logits.dtype}, not the float32 that is written"
    if logits.dim() != 1 or (vocab is not None and logits.shape[0] != vocab):
        return f"logits have shape {tuple(logits.shape)}, not ({vocab if vocab is not None else 'vocabulary'},)"
    if not bool(torch.isfinite(logits).all()):
        return "logits hold NaN or infinite values"
    if not isinstance(info, dict) or not isinstance(info.get("answer"), str):
        return "answer is missing or not text"
    tokens = info.get("tokens")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        return f"token count {tokens!r} is not an int >= 1"
    for name in ("prefill_ms", "peak_mib"):
        value = info.get(name)
        if value is not None and not finite_number(value):
            return f"{name} {value!r} is not a finite number"
    return None


def _mean(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sorted(sums)}


def _one_line(row: Mapping[str, Any]) -> str:
    if row["status"] != "done":
        return f"{row['label']}: {row['status']} ({row['reason']})"
    first = ("fidelity.kl", "fidelity.top1_agree", "reconstruction.residual", "accuracy.vqa_score", "flops.ratio",
             "latency.selection_ms")
    keys = [k for k in first if k in row["metrics"]] or list(row["metrics"])[:4]
    shown = ", ".join(f"{k}={row['metrics'][k]:.3g}" for k in keys)
    return f"{row['label']}: {shown}"


def _plugin_versions() -> dict[str, str | None]:
    return {p["plugin"]: p["version"] for p in get_host().list_plugins()}


def _stamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _bar(**kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(**kwargs)
