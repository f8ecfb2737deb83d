"""lmms-eval result files as resprune result rows: ``resprune report`` lays them out like a sweep.

``python -m lmms_eval --model resprune ... --output_path DIR`` writes
``DIR/<model>/<date>_results.json`` per run. ``load_lmms_eval(DIR)`` reads every such file of the
``resprune`` model and makes one row per (checkpoint, pipeline, overrides, run settings), the
newest file winning for a task run twice. A row's metrics are:

- per task, its **headline score** under the task's name (``gqa``, ``mme``, ``pope``): the
  score the paper's tables print (``HEADLINE``; MME is perception + cognition, fractions are
  shown in %), else the task's first higher-is-better metric;
- every numeric metric as ``<task>.<metric>`` (``pope.pope_accuracy``; a filter other than
  ``none`` as ``<metric>@<filter>``), lmms-eval's raw values;
- what the model measured (means over the requests): ``tokens.visual``, ``tokens.visual_kept``,
  ``tokens.prompt``, ``flops.prefill_tflops``, ``flops.ratio``, ``kv_cache.mib``,
  ``latency.selection_ms``.

The ``pipeline=none`` run of a checkpoint is its ``full`` row; every row's ``rel`` is the mean
over the headline scores it shares with that row of (score / full score), the paper's Rel.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InvalidInputError, ResPruneError
from ..metrics import finite_number
from ..runfiles import files_inside
from . import MODEL_ID, NO_PRUNING, STATS_PREFIX, parse_model_args

__all__ = ["HEADLINE", "EFFICIENCY", "is_lmms_eval_dir", "load_lmms_eval", "lmms_columns", "result_files"]

HEADLINE: dict[str, tuple[tuple[str, ...], float]] = {
    "mme": (("mme_perception_score", "mme_cognition_score"), 1.0),
    "gqa": (("exact_match",), 100.0),
    "scienceqa_img": (("exact_match",), 100.0),
    "pope": (("pope_f1_score",), 100.0),
    "pope_pop": (("pope_f1_score",), 100.0),
    "pope_adv": (("pope_f1_score",), 100.0),
    "pope_random": (("pope_f1_score",), 100.0),
    "textvqa_val": (("exact_match",), 100.0),
    "vizwiz_vqa_val": (("exact_match",), 100.0),
    "vqav2_val": (("exact_match",), 100.0),
    "mmbench_en_dev": (("gpt_eval_score",), 1.0),
    "mmvet": (("gpt_eval_score",), 1.0),
    "resprune_samples": (("exact_match",), 100.0),
}
"""Task -> (metrics summed, scale) of its headline score: what the paper prints (MME total;
GQA, ScienceQA-IMG, TextVQA, VizWiz, VQAv2 accuracy in %; POPE F1 in %; MMBench and MM-Vet as
lmms-eval reports them). Other tasks: their first higher-is-better metric, as reported."""

EFFICIENCY = ("tokens.visual_kept", "flops.ratio", "latency.selection_ms")
"""The measured columns a report shows after the scores."""

_STATS = "avg_" + STATS_PREFIX


def result_files(path: str | Path) -> list[Path]:
    """lmms-eval's aggregated result files under ``path`` (``*_results.json``, any depth). A
    symlinked file or folder is followed when its target is inside ``path``; one leading outside
    is skipped with a warning."""
    root = Path(path)
    return files_inside(root, "*_results.json") if root.is_dir() else []


def is_lmms_eval_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding lmms-eval result files (and no sweep's results)."""
    root = Path(path)
    return root.is_dir() and not (root / "results.jsonl").exists() and bool(result_files(root))


def load_lmms_eval(path: str | Path) -> list[dict[str, Any]]:
    """The result rows of every ``resprune`` run under ``path`` (see the module docstring);
    ``InvalidInputError`` naming the file if one cannot be read."""
    files = result_files(path)
    if not files:
        raise InvalidInputError(f"no lmms-eval result files (*_results.json) under '{path}': pass the folder given "
                                "to lmms-eval's --output_path.")
    runs, bad = [], []
    for file in files:
        try:
            run = _read(file)
        except InvalidInputError as exc:
            bad.append(exc)
            continue
        if run is not None:
            runs.append(run)
    if bad and not runs:
        raise bad[0]
    for exc in bad:  # other files are fine: report them, skip this one
        warnings.warn(f"skipped {exc}", RuntimeWarning, stacklevel=2)
    if not runs:
        raise InvalidInputError(f"the lmms-eval results under '{path}' are from other models; none has "
                                f"--model {MODEL_ID}.")
    rows: dict[str, dict[str, Any]] = {}
    for run in sorted(runs, key=lambda r: (r["date"], str(r["file"]))):  # newer files overwrite older tasks
        row = rows.setdefault(run["cell"], _new_row(run))
        row["metrics"].update(run["metrics"])
        row["tasks"].update(run["tasks"])
        row["sources"].append(str(run["file"]))
    out = list(rows.values())
    for row in out:
        row["examples"] = sum(row["tasks"].values())
        row["tasks"] = sorted(row["tasks"])
    _relative(out)
    _per_sample(Path(path), out)
    return out


DEFAULT_AGAINST = "residual_energy"
"""The method an lmms-eval report tests every row against (a row's method or selector), as a sweep's."""


def _per_sample(root: Path, rows: list[dict[str, Any]]) -> None:
    """Intervals and paired tests from the per-sample logs (``--log_samples``), where there are any."""
    from ..comparisons import paired_tests
    from .samples import headline_tests, row_intervals, samples_of

    examples = [samples_of(root, row) for row in rows]
    for row, mine in zip(rows, examples):
        if mine:
            row["intervals"] = row_intervals(mine, HEADLINE)
    if any(examples):
        paired_tests(rows, examples, DEFAULT_AGAINST)
        for row in rows:
            headline_tests(row, HEADLINE)


def lmms_columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    """A report's columns: the headline score of each task (the paper's benchmark order for
    the ones ``HEADLINE`` knows, then the others by name), then the measured ``EFFICIENCY``."""
    rows = list(rows)
    tasks = {t for r in rows for t in r.get("tasks", ())}
    order = list(HEADLINE)
    tasks_sorted = sorted(tasks, key=lambda t: (order.index(t) if t in order else len(order), t))
    return tasks_sorted + [m for m in EFFICIENCY if any(m in r["metrics"] for r in rows)]


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{path}: not a readable lmms-eval result file ({exc}); an interrupted run leaves "
                                "one half-written: delete it and run that evaluation again.") from None
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict) or not isinstance(data.get("results"), dict):
        raise InvalidInputError(f"{path}: no 'config' and 'results' blocks; not an lmms-eval result file.")
    if config.get("model") != MODEL_ID:
        return None
    _check_types(path, data)
    raw_args = config.get("model_args") or ""
    try:
        args, overrides = parse_model_args(raw_args if isinstance(raw_args, str) else dict(raw_args))
    except ConfigError as exc:
        raise InvalidInputError(f"{path}: config.model_args: {exc}") from None
    pipeline = str(args.get("pipeline", "resprune-llava15"))
    model = str(args.get("pretrained", "llava-hf/llava-1.5-7b-hf"))
    settings = {k: config.get(k) for k in ("limit", "offset", "gen_kwargs") if config.get(k) not in (None, "", 0)}
    settings.update({k: args[k] for k in ("dtype", "seed") if k in args})
    key = json.dumps([model, pipeline, sorted(overrides), settings], sort_keys=True, default=str)
    subtasks = {t for group in (data.get("group_subtasks") or {}).values() for t in group}
    metrics, tasks = _scores(path, data, subtasks)
    stats = data.get("throughput") or {}
    metrics.update({k[len(_STATS):]: _number(path, f"throughput.{k}", v) for k, v in stats.items()
                    if k.startswith(_STATS) and k != _STATS + "requests"})
    return {"file": path, "date": str(data.get("date") or ""), "cell": hashlib.sha1(key.encode()).hexdigest()[:10],
            "model": model, "pipeline": pipeline, "overrides": overrides, "settings": settings,
            "metrics": metrics, "tasks": tasks}


def _check_types(path: Path, data: dict[str, Any]) -> None:
    """``InvalidInputError`` naming the file, the key and what was expected, for the first block of
    a result file whose type is not the one lmms-eval writes."""

    def bad(key: str, expected: str, value: Any) -> InvalidInputError:
        shown = json.dumps(value, default=str)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        return InvalidInputError(f"{path}: {key}: expected {expected}, got {type(value).__name__} {shown}; not what "
                                 f"lmms-eval writes (an edited or damaged file): fix it or run that evaluation again.")

    model_args = data["config"].get("model_args")
    if model_args is not None and not isinstance(model_args, (str, dict)):
        raise bad("config.model_args", "a 'key=value,...' string or a mapping", model_args)
    for task, values in data["results"].items():
        if not isinstance(values, dict):
            raise bad(f"results.{task}", "a mapping of 'metric,filter' to values", values)
    for block, inner in (("group_subtasks", "a list of task names"), ("higher_is_better", "a mapping"),
                         ("n-samples", "a mapping such as {\"effective\": 100}"), ("throughput", None)):
        value = data.get(block)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise bad(block, "a mapping", value)
        if inner is None:
            continue
        for task, item in value.items():
            ok = (isinstance(item, list) and all(isinstance(t, str) for t in item)) if block == "group_subtasks" \
                else isinstance(item, dict)
            if not ok:
                raise bad(f"{block}.{task}", inner, item)
    for task, counts in (data.get("n-samples") or {}).items():
        effective = counts.get("effective", 0)
        if isinstance(effective, bool) or not isinstance(effective, (int, float)) or not math.isfinite(effective) \
                or effective < 0 or effective != int(effective):
            raise bad(f"n-samples.{task}.effective", "a count (an int >= 0)", effective)


def _number(path: Path, key: str, value: Any) -> float:
    """``value`` as a float, or NaN (a report shows ``n/a``) with a warning naming the file and the
    key when it is not a finite number (NaN, Infinity, text, a list...): never dropped silently."""
    if finite_number(value):
        return float(value)
    shown = json.dumps(value, default=str)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    warnings.warn(f"{path}: {key} is {shown}, not a finite number; shown as n/a", RuntimeWarning, stacklevel=4)
    return math.nan


def _scores(path: Path, data: dict[str, Any], subtasks: set[str]) -> tuple[dict[str, float], dict[str, int]]:
    """Headline and detailed scores of the file's tasks, and each top-level task's examples. A key
    without a filter (``alias``) is a label, not a metric; a metric whose value is not a finite
    number is kept as NaN, with a warning."""
    metrics: dict[str, float] = {}
    tasks: dict[str, int] = {}
    higher = data.get("higher_is_better") or {}
    counts = data.get("n-samples") or {}
    for task, values in data["results"].items():
        plain: dict[str, float] = {}
        for key, value in values.items():
            name, comma, filt = key.partition(",")
            if "_stderr" in name or not comma:
                continue
            plain[name if filt in ("", "none") else f"{name}@{filt}"] = _number(path, f"results.{task}.{key}", value)
        metrics.update({f"{task}.{name}": v for name, v in plain.items()})
        if task in subtasks:
            continue  # a group's member: the group's own row counts
        headline = _headline(task, plain, higher.get(task) or {})
        if headline is not None:
            metrics[task] = headline
            tasks[task] = int((counts.get(task) or {}).get("effective", 0))
    return metrics, tasks


def _headline(task: str, values: dict[str, float], higher: dict[str, bool]) -> float | None:
    names, scale = HEADLINE.get(task, ((), 1.0))
    if names and all(n in values for n in names):
        return scale * sum(values[n] for n in names)
    first = next((n for n in values if higher.get(n.split("@")[0], True)), None)
    return None if first is None else values[first]


def _new_row(run: dict[str, Any]) -> dict[str, Any]:
    full = run["pipeline"] == NO_PRUNING
    params = _params(run["overrides"])
    budget = params.pop("budget", None)
    selector = None
    # an override written as an interpolation is shown as the text that was written: resolving it
    # here would put the reader's environment (or a failing lookup) into the report
    literal = any(_INTERPOLATION in item for item in run["overrides"])
    note = None
    if not full and not literal:
        try:
            from ..config import load_config, selector_label

            cfg = load_config(run["pipeline"], run["overrides"])
            budget, selector = cfg.budget, selector_label(cfg)
        except ResPruneError as exc:  # e.g. a pipeline YAML no longer there: keep what the run's model_args say
            note = (f"pipeline {run['pipeline']!r} could not be read here ({exc}); budget and method are shown as "
                    f"model_args wrote them")
            warnings.warn(f"{run['file']}: {note}", RuntimeWarning, stacklevel=3)
    method = "full" if full else Path(run["pipeline"]).name.removesuffix(".yaml")
    extra = " ".join(f"{k}={v}" for k, v in params.items())
    settings = " ".join(f"{k}={v}" for k, v in run["settings"].items())
    label = " ".join(x for x in (method, extra, None if full else f"budget={'?' if budget is None else budget}",
                                 f"({settings})" if settings else "") if x)
    if extra:
        method = f"{method} {extra}"
    return {"model": run["model"], "cell": run["cell"], "label": label, "method": method, "selector": selector,
            "budget": budget, "params": {"pipeline": run["pipeline"], **params, **run["settings"]},
            "status": "done", "reason": note, "examples": 0, "metrics": {}, "rel": None, "tasks": {},
            "sources": []}


_INTERPOLATION = "${"


def _params(overrides: Iterable[str]) -> dict[str, Any]:
    """Dotlist overrides as ``{dotted key: value}``: values parsed the way the config parses them,
    never resolved (an interpolation stays the text that was written), the text itself when it
    is not a YAML value."""
    from ..config import parse_value

    out: dict[str, Any] = {}
    for item in overrides:
        key, _, text = item.partition("=")
        if _INTERPOLATION in text:
            out[key] = text
            continue
        try:
            out[key] = parse_value(text, key)
        except ConfigError:  # not a YAML value: keep the written text
            out[key] = text
    return out


def _relative(rows: list[dict[str, Any]]) -> None:
    """Each row's ``rel`` against its checkpoint's ``full`` row (mean ratio of shared headline scores)."""
    for model in {r["model"] for r in rows}:
        group = [r for r in rows if r["model"] == model]
        full = next((r for r in group if r["method"] == "full"), None)
        if full is None:
            continue
        for row in group:
            ratios = [row["metrics"][t] / full["metrics"][t] for t in row["tasks"]
                      if t in full["tasks"] and finite_number(row["metrics"].get(t)) and full["metrics"].get(t)]
            row["rel"] = sum(ratios) / len(ratios) if ratios else None
