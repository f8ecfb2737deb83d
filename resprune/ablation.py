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
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .config import load_config, to_yaml
from .costs import llm_dims
from .data import describe_source, load_records, open_image
from .errors import ConfigError, ResPruneError, UnknownStrategyError, suggest
from .metrics import Example, Metric, Reference
from .models import chat_inputs
from .pipeline import Pipeline
from .plugins import get_host

__all__ = ["Ablation", "AblationError", "Cell", "ResultTable", "expand_grid"]


class AblationError(ConfigError):
    """An invalid ablation grid or setup, found before any model work."""


@dataclasses.dataclass
class Cell:
    """One combination of the grid.

    Attributes:
        id: stable short hash of the resolved config (folder name in the run).
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
    """Rows of results (one dict per cell, plus one ``full`` row per model)."""

    def to_markdown(self, metrics: list[str] | None = None) -> str:
        from .report import results_table

        models = sorted({r["model"] for r in self})
        return "\n\n".join(results_table(list(self), metrics=metrics, model=m) for m in models)

    def done(self) -> list[dict[str, Any]]:
        return [r for r in self if r["status"] == "done"]


# --- the grid -------------------------------------------------------------------------


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _selector_params(name: str) -> set[str]:
    cls = get_host().selectors.get(name)
    return {f.name for f in dataclasses.fields(cls.Params)}


def expand_grid(base: Any, grid: Mapping[str, Any]) -> list[Cell]:
    """Every cell of ``grid`` over ``base``, validated (raises ``AblationError``).

    The grid key ``base`` varies the config itself (e.g. the settings of the paper's
    Table IV are separate shipped configs); its values then label the rows.
    """
    if not isinstance(grid, Mapping) or not grid:
        raise AblationError("grid must be a non-empty mapping of config keys to lists of values.")
    values = {k: (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in grid.items()}
    for key, vals in values.items():
        if not vals:
            raise AblationError(f"grid key '{key}' has no values.")
    bases = values.pop("base", [base])
    cells: list[Cell] = []
    seen: dict[str, Cell] = {}
    for b in bases:
        cells += _expand_one(b, values, seen, name=_base_name(b) if len(bases) > 1 else None)
    return cells


def _base_name(base: Any) -> str:
    return Path(base).stem if isinstance(base, (str, Path)) else "<dict>"


def _expand_one(base: Any, values: dict[str, list[Any]], seen: dict[str, Cell], name: str | None) -> list[Cell]:
    try:
        base_cfg = load_config(base)
    except ConfigError as exc:
        raise AblationError(f"base config: {exc}") from None
    selectors = [str(s) for s in values.get("selector", [base_cfg.selector.name])]
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
        selector = str(params.get("selector", base_cfg.selector.name))
        dropped = [k for k in params if k.startswith("selector.params.")
                   and k[len("selector.params."):] not in _selector_params(selector)]
        applied = {k: v for k, v in params.items() if k not in dropped}
        shown = {k: v for k, v in applied.items() if k in varying}
        head = [name] if name else []
        if not name or "selector" in values:
            head.append(selector)
        method = " ".join(head + [f"{_short(k)}={v}" for k, v in shown.items()])
        budget = applied.get("budget", base_cfg.budget)
        label = f"{method} budget={budget}"
        if name:
            params = {"base": name, **params}
        try:
            cfg = load_config(base, [f"{k}={_yaml_value(v)}" for k, v in applied.items()])
        except ConfigError as exc:
            raise AblationError(f"cell '{label}' ({_fmt(params)}): {exc}") from None
        key = to_yaml(cfg)
        cell_id = hashlib.sha1(key.encode()).hexdigest()[:10]
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


def _yaml_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


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
        max_new_tokens: length of the greedy answers.
        seed: set before every example of every cell.
        limit: use at most this many examples.
        progress: show progress bars.
    """

    def __init__(self, base: Any, grid: Mapping[str, Any], *, model: Any, processor: Any = None,
                 dataset: Any = None, metrics: Sequence[str] = ("fidelity", "reconstruction", "flops", "latency"),
                 model_name: str | None = None, max_new_tokens: int = 16, seed: int = 0, limit: int | None = None,
                 progress: bool = True) -> None:
        self.base, self.grid = base, dict(grid)
        self.model, self.processor = model, processor
        self.model_name = model_name or f"{type(model).__name__}:{getattr(model.config, '_name_or_path', '') or 'random'}"
        self.max_new_tokens, self.seed, self.progress = int(max_new_tokens), int(seed), progress
        self.metrics: dict[str, Metric] = {}
        for name in metrics:
            try:
                self.metrics[name] = get_host().metrics.get(name)({})
            except UnknownStrategyError as exc:
                raise AblationError(f"metrics: {exc}") from None
        self.needs = frozenset().union(*(m.needs for m in self.metrics.values()))
        self.cells = expand_grid(base, self.grid)
        self.pipelines: dict[str, Pipeline] = {}
        from .injection import find_injector

        injector_cls = find_injector(model)
        for cell in self.cells:
            if cell.skip:
                continue
            pipe = Pipeline.from_config(cell.config)
            try:
                params = OmegaConf.to_container(cell.config.backbone.params) \
                    if cell.config.backbone.model_type in injector_cls.model_types else {}
                injector_cls(params).check_pipeline(pipe, processor, None)
            except ResPruneError as exc:
                raise AblationError(f"cell '{cell.label}': {exc}") from None
            self.pipelines[cell.id] = pipe
        self.dataset_source = describe_source(dataset)
        self.records = load_records(dataset, limit=limit)
        if not self.records:
            raise AblationError("the dataset has no records.")
        self.dims = llm_dims(model.config)
        self.rank, self.world, self._state = _distributed()

    # --- running -----------------------------------------------------------------------

    def run(self, out_dir: str | Path) -> ResultTable:
        """Run every cell not finished yet in ``out_dir``; return the results of all."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._write_spec(out)
        mine = [i for i in range(len(self.records)) if i % self.world == self.rank]
        references = self._references(out, mine)  # also the full row (accuracy, FLOPs of the unpruned model)
        bar = _bar(total=len(self.cells), desc="cells", disable=not self.progress or self.rank != 0)
        for n, cell in enumerate(self.cells, 1):
            if not cell.skip:
                self._run_cell(out, cell, mine, references)
            self._barrier()
            if self.rank == 0:
                row = self._summarise(out, cell)
                bar.write(f"[{n}/{len(self.cells)}] {_one_line(row)}")
            bar.update(1)
        bar.close()
        self._barrier()
        table = self.collect(out)
        if self.rank == 0:
            with (out / "results.jsonl").open("w") as fh:
                for row in table:
                    fh.write(json.dumps(row) + "\n")
        return table

    def _write_spec(self, out: Path) -> None:
        if self.rank != 0:
            return
        spec = {"base": self.base if isinstance(self.base, str) else OmegaConf.to_container(OmegaConf.create(
                    dict(self.base))), "grid": self.grid, "model": self.model_name, "dataset": self.dataset_source,
                "examples": len(self.records), "metrics": list(self.metrics), "max_new_tokens": self.max_new_tokens,
                "seed": self.seed, "cells": [{"id": c.id, "label": c.label, "skip": c.skip} for c in self.cells]}
        (out / "sweep.json").write_text(json.dumps(spec, indent=2, default=str))

    def _inputs(self, record: Mapping[str, Any]) -> Any:
        image = open_image(record["image"])
        return chat_inputs(self.processor, [image], [str(record["question"])], device=self.model.device)

    def _generate(self, inputs: Any) -> tuple[str, torch.Tensor, float, float | None]:
        device = self.model.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = _clock(device)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)
        total_ms = (_clock(device) - start) * 1e3
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        tok = getattr(self.processor, "tokenizer", self.processor)
        answer = tok.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        return answer, out.logits[0][0].float().cpu(), total_ms, peak

    def _prefill_ms(self, inputs: Any) -> float:
        device = self.model.device
        self.model(**inputs)  # warm-up
        start = _clock(device)
        self.model(**inputs)
        return (_clock(device) - start) * 1e3

    def _references(self, out: Path, mine: list[int]) -> dict[int, Reference]:
        folder = out / "reference"
        folder.mkdir(exist_ok=True)
        refs: dict[int, Reference] = {}
        bar = _bar(total=len(mine), desc="unpruned model", disable=not self.progress or self.rank != 0, leave=False)
        for i in mine:
            path = folder / f"ex{i:05d}.pt"
            key = _record_key(self.records[i])
            saved = torch.load(path, weights_only=False) if path.exists() else None
            if saved is not None and saved.pop("key", None) == key:
                refs[i] = Reference(**saved)
            else:
                torch.manual_seed(self.seed)
                inputs = self._inputs(self.records[i])
                with torch.no_grad():
                    answer, logits, _, peak = self._generate(inputs)
                    prefill = self._prefill_ms(inputs) if "latency" in self.needs else None
                refs[i] = Reference(answer, logits, int(inputs["attention_mask"].sum()), prefill, peak)
                torch.save({**dataclasses.asdict(refs[i]), "key": key}, path)
            bar.update(1)
        bar.close()
        return refs

    def _run_cell(self, out: Path, cell: Cell, mine: list[int], references: dict[int, Reference]) -> None:
        folder = out / "cells" / cell.id
        folder.mkdir(parents=True, exist_ok=True)
        summary = folder / "summary.json"
        if summary.exists() and json.loads(summary.read_text()).get("status") == "done":
            return
        if self.rank == 0:
            (folder / "config.yaml").write_text(to_yaml(cell.config))
        done_file = folder / f"examples.rank{self.rank}.jsonl"
        done = {json.loads(line)["index"] for line in done_file.read_text().splitlines() if line.strip()} \
            if done_file.exists() else set()
        meta = {"cell": cell.id, "label": cell.label, "params": cell.params, "model": self.model_name,
                "seed": self.seed, "device": str(self.model.device), "host": platform.node(),
                "torch": torch.__version__, "plugins": _plugin_versions(), "rank": self.rank, "world": self.world,
                "started": _stamp()}
        pipe = self.pipelines[cell.id]
        todo = [i for i in mine if i not in done]
        bar = _bar(total=len(todo), desc=cell.label[:40], disable=not self.progress or self.rank != 0, leave=False)
        try:
            with pipe.attach(self.model, self.processor) as attached, torch.no_grad():
                attached.profile = "latency" in self.needs
                for i in todo:
                    values = self._example(attached, self.records[i], references.get(i))
                    with done_file.open("a") as fh:
                        fh.write(json.dumps({"index": i, "metrics": values}) + "\n")
                    bar.update(1)
            meta["status"] = "done"
        except Exception as exc:  # noqa: BLE001 - a failing cell is recorded; the sweep goes on
            meta["status"] = "failed"
            meta["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            bar.close()
        meta["finished"] = _stamp()
        (folder / f"meta.rank{self.rank}.json").write_text(json.dumps(meta, indent=2, default=str))

    def _example(self, attached: Any, record: Mapping[str, Any], reference: Reference | None) -> dict[str, float]:
        torch.manual_seed(self.seed)
        inputs = self._inputs(record)
        answer, logits, total_ms, peak = self._generate(inputs)
        batch = attached.last
        timings: dict[str, float] = {}
        if "latency" in self.needs:
            timings = {"selection_ms": float(batch.prune_ms or 0.0), "prefill_ms": self._prefill_ms(inputs),
                       "total_ms": total_ms}
        example = Example(record=dict(record), answer=answer, first_logits=logits, selections=batch.selections,
                          tokens_before=int(inputs["attention_mask"].sum()),
                          tokens_after=int(batch.attention_mask.sum()), dims=self.dims,
                          features=[f.detach().float().cpu() for f in batch.features] if "features" in self.needs
                          else [], timings=timings, peak_mib=peak, reference=reference)
        values: dict[str, float] = {}
        for name, metric in self.metrics.items():
            for key, value in metric.compute(example).items():
                values[f"{name}.{key}"] = float(value)
        return values

    # --- results -------------------------------------------------------------------------

    def _summarise(self, out: Path, cell: Cell) -> dict[str, Any]:
        row = self._row(out, cell)
        if not cell.skip:
            (out / "cells" / cell.id / "summary.json").write_text(json.dumps(row, indent=2, default=str))
        return row

    def _row(self, out: Path, cell: Cell) -> dict[str, Any]:
        row: dict[str, Any] = {"cell": cell.id, "label": cell.label, "model": self.model_name, "method": cell.method,
                               "budget": cell.budget, "params": cell.params, "status": "skipped", "reason": cell.skip,
                               "examples": 0, "metrics": {}, "rel": None}
        if cell.skip:
            return row
        folder = out / "cells" / cell.id
        metas = [json.loads(p.read_text()) for p in sorted(folder.glob("meta.rank*.json"))]
        failed = [m for m in metas if m.get("status") == "failed"]
        lines = [json.loads(line) for p in sorted(folder.glob("examples.rank*.jsonl"))
                 for line in p.read_text().splitlines() if line.strip()]
        row["examples"] = len({line["index"] for line in lines})
        row["metrics"] = _mean([line["metrics"] for line in lines])
        if failed:
            row.update(status="failed", reason=failed[0]["error"])
        elif row["examples"] >= len(self.records):
            row["status"] = "done"
        else:
            row.update(status="failed", reason=f"only {row['examples']} of {len(self.records)} examples finished")
        return row

    def _full_row(self, out: Path) -> dict[str, Any]:
        folder = out / "reference"
        values = []
        for i, record in enumerate(self.records):
            path = folder / f"ex{i:05d}.pt"
            if not path.exists():
                continue
            saved = torch.load(path, weights_only=False)
            saved.pop("key", None)
            ref = Reference(**saved)
            per: dict[str, float] = {}
            for name, metric in self.metrics.items():
                for key, value in metric.baseline(record, ref, self.dims).items():
                    per[f"{name}.{key}"] = float(value)
            values.append(per)
        return {"cell": "full", "label": "full (unpruned)", "model": self.model_name, "method": "full",
                "budget": None, "params": {}, "status": "done", "reason": None, "examples": len(values),
                "metrics": _mean(values), "rel": 1.0}

    def collect(self, out_dir: str | Path) -> ResultTable:
        """The results in ``out_dir`` (finished or not) as a ``ResultTable``."""
        out = Path(out_dir)
        full = self._full_row(out)
        rows = [full] + [self._row(out, cell) for cell in self.cells]
        relative = {f"{n}.{k}" for n, m in self.metrics.items() for k in m.relative}
        for row in rows[1:]:
            ratios = [row["metrics"][key] / full["metrics"][key] for key in relative
                      if key in row["metrics"] and full["metrics"].get(key)]
            row["rel"] = sum(ratios) / len(ratios) if ratios else None
        if not any(key in full["metrics"] and full["metrics"][key] for key in relative):
            full["rel"] = None
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


def _record_key(record: Mapping[str, Any]) -> str:
    image = record["image"]
    return f"{image if isinstance(image, str) else type(image).__name__}|{record['question']}"


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


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _bar(**kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(**kwargs)
