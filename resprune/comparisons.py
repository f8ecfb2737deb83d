"""Per-example comparisons between the rows of one run: what a reviewer asks of "A beats B".

Each function works on the rows of a result table and, per row, its per-example metrics
``{example: {metric key: value}}`` (``examples_of`` reads them from a run folder: the cells'
``examples.rank*.jsonl`` and the unpruned model's ``full.examples.jsonl``):

- ``paired_tests``: each row against a reference method at its budget, metric by metric
  (McNemar or Wilcoxon, ``resprune.stats.paired_test``), Holm-corrected across the table;
- ``relative_interval``: the paper's Rel. (mean over metrics of the row's mean over the full
  model's) with a paired bootstrap interval over the examples;
- ``split_on``: VTC-Bench's difficulty split. The examples are divided by whether a simple
  baseline at the same budget (``downsample``, or ``pool`` on fixed-resolution backbones) already
  gets them right (``resprune.report.split_table`` shows each method on both groups).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import InvalidInputError
from .metrics import finite_number
from .runfiles import RunFileError, check_inside, read_jsonl

__all__ = ["FULL_EXAMPLES", "examples_of", "intervals", "metric_interval", "paired_tests", "relative_interval", "split_on",
           "SPLIT_KEYS"]

FULL_EXAMPLES = "full.examples.jsonl"
"""The unpruned model's per-example metrics in a run folder (lines like a cell's examples)."""

Examples = dict[Any, dict[str, float]]


def example_line(path: Path, n: int, line: Any) -> tuple[int, str, dict[str, float]]:
    """``(index, record key, metrics)`` of one line of an examples file, or ``RunFileError``."""
    if not (isinstance(line, dict) and isinstance(line.get("index"), int) and isinstance(line.get("record"), str)
            and isinstance(line.get("metrics"), dict)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in line["metrics"].values())):
        raise RunFileError(f"{path}:{n}: not an example line (expected {{\"index\": int, \"record\": str, \"metrics\": "
                           f"{{name: number}}}}); delete the line (its example is recomputed) or the file.")
    return line["index"], line["record"], line["metrics"]


def _read(run: Path, paths: Sequence[Path], records: set[str] | None) -> Examples:
    """Record -> metrics, in the run's example order (the order the intervals of the run used)."""
    found: dict[str, tuple[int, dict[str, float]]] = {}
    for path in paths:
        check_inside(run, path)
        for n, line in read_jsonl(path):
            index, record, metrics = example_line(path, n, line)
            if records is None or record in records:
                found[record] = (index, {k: float(v) for k, v in metrics.items()})  # a later line replaces an earlier
    return {record: metrics for record, (_, metrics) in sorted(found.items(), key=lambda item: item[1][0])}


def examples_of(run_dir: str | Path, rows: Sequence[Mapping[str, Any]]) -> list[Examples]:
    """Per row of ``run_dir``'s results, its per-example metrics keyed by record (``{}`` where the
    folder holds none: a row that did not run, or a run written before they were kept). Only the
    records the unpruned model ran count (a cell folder reused by another dataset holds others).
    (A folder of lmms-eval results: ``resprune.lmms.samples.samples_of``.)"""
    run = Path(run_dir)
    full = _read(run, [run / FULL_EXAMPLES], None)
    records = set(full) if full else None
    out = []
    for row in rows:
        cell = row.get("cell")
        if row.get("method") == "full":
            out.append(full)
        elif isinstance(cell, str) and cell and "/" not in cell and "\\" not in cell and cell not in (".", ".."):
            folder = run / "cells" / cell
            check_inside(run, folder)
            out.append(_read(run, sorted(folder.glob("examples.rank*.jsonl")), records))
        else:
            out.append({})
    return out


def budget_key(row: Mapping[str, Any]) -> str:
    return repr(row["budget"])


def _matches(row: Mapping[str, Any], name: str) -> bool:
    return name in (row.get("method"), row.get("selector"))


def paired_tests(rows: list[dict[str, Any]], examples: Sequence[Examples], against: str) -> None:
    """Each done row against the ``against`` row (its method or selector) of its budget, metric by
    metric, on the examples both finished: McNemar or Wilcoxon (``resprune.stats.paired_test``),
    Holm-corrected per metric across the rows of the table; written to ``row["tests"]`` (replacing
    what was there)."""
    from .stats import holm, paired_test

    done = [i for i, row in enumerate(rows) if row["method"] != "full" and row["status"] == "done"]
    for i in done:
        rows[i].pop("tests", None)
    reference = {}
    for i in done:
        if _matches(rows[i], against):
            reference.setdefault(budget_key(rows[i]), i)
    raw: dict[str, dict[str, float]] = {}
    for i in done:
        j = reference.get(budget_key(rows[i]))
        if j is None or j == i:
            continue
        mine, theirs = examples[i], examples[j]
        common = sorted(set(mine) & set(theirs))
        for key in rows[i]["metrics"]:
            pairs = [(mine[k][key], theirs[k][key]) for k in common if key in mine[k] and key in theirs[k]
                     and math.isfinite(mine[k][key]) and math.isfinite(theirs[k][key])]
            if len(pairs) >= 2:
                raw.setdefault(key, {})[str(i)] = paired_test([a for a, _ in pairs], [b for _, b in pairs])
    for key, pvalues in raw.items():
        for i, p in holm(pvalues).items():
            rows[int(i)].setdefault("tests", {"against": against, "p": {}})["p"][key] = p


def metric_interval(key: str, values: Sequence[float], *, seed: int = 0) -> Any:
    """``resprune.stats.mean_interval`` of one metric's per-example values: Wilson's interval only
    where 0/1 values count successes (``resprune.metric_traits.counts_successes``: accuracy, not a
    FLOPs ratio of 1)."""
    from .metric_traits import counts_successes
    from .stats import mean_interval

    return mean_interval(values, seed=seed, proportion=counts_successes(key))


def intervals(examples: Sequence[Mapping[str, float]], *, seed: int = 0) -> dict[str, list[float]]:
    """Per metric key of the per-example values, the 95 % interval ``[low, high]`` of its mean over
    the examples with a finite value (``metric_interval``)."""
    out = {}
    for key in sorted({key for values in examples for key in values}):
        finite = [values[key] for values in examples if key in values and math.isfinite(values[key])]
        if finite:
            ci = metric_interval(key, finite, seed=seed)
            out[key] = [ci.low, ci.high]
    return out


def relative_interval(mine: Examples, full: Examples, keys: Sequence[str], *, seed: int = 0) -> list[float] | None:
    """The 95 % interval of Rel. (the mean over ``keys`` of the row's mean over the full model's)
    on the examples where both have every key (``resprune.stats.ratio_interval``); ``None`` when
    there are none or a full-model mean is 0."""
    from .stats import ratio_interval

    keys = [k for k in keys if any(k in v for v in full.values())]
    common = [e for e in mine if e in full
              and all(k in mine[e] and k in full[e] and math.isfinite(mine[e][k]) and math.isfinite(full[e][k])
                     for k in keys)]
    if not keys or not common:
        return None
    ci = ratio_interval([[mine[e][k] for k in keys] for e in common], [[full[e][k] for k in keys] for e in common],
                        seed=seed)
    return [ci.low, ci.high] if math.isfinite(ci.low) and math.isfinite(ci.high) else None


SPLIT_KEYS = ("accuracy.exact_match", "fidelity.exact_match", "fidelity.top1_agree")
"""What says a baseline "already gets an example", first present first: its correctness (among the
examples the full model answers correctly, VTC-Bench's rule), else agreement with the full model
(the same answer, else the same first token)."""


def split_on(baseline: Examples, full: Examples, on: str | None = None) -> tuple[str, set[Any], set[Any], int]:
    """``(what, easy, hard, left out)``: the examples the baseline gets right by ``on`` (a 0/1
    metric key), the rest, and how many were left out.

    Default: the first of ``SPLIT_KEYS`` the baseline has (an accuracy only where the full model
    gets some example right), else each example's own 0/1 metric (lmms-eval: each task's
    per-sample correctness). For a key that is not an agreement with the full model
    (``fidelity.*``) only the examples the full model gets right are split (VTC-Bench's groups B
    and A); the others are left out and counted."""
    have = {k for values in baseline.values() for k in values}
    binary = sorted(k for k in have if all(v[k] in (0.0, 1.0) for v in baseline.values() if k in v))
    if on is not None:
        if on not in have:
            raise InvalidInputError(f"--split-on {on}: the baseline's examples have no metric '{on}'; they have "
                                    f"{', '.join(sorted(have)) or 'no metrics'}.")
        if on not in binary:
            raise InvalidInputError(f"--split-on {on}: its values are not all 0 or 1, so they do not say whether the "
                                    f"baseline got an example right; pick a per-example 0/1 metric "
                                    f"({', '.join(binary) or 'the run has none'}).")
        keys = [on]
    else:
        usable = [k for k in SPLIT_KEYS if k in binary  # an accuracy the full model never gets leaves nothing to split
                  and (k.startswith("fidelity.") or any(v.get(k) == 1.0 for v in full.values()))]
        keys = usable[:1] or binary
    if not keys:
        raise InvalidInputError(f"--split: the baseline's examples have no 0/1 metric saying it got an example "
                                f"({', '.join(SPLIT_KEYS)}, or an lmms-eval task's per-sample correctness); they have "
                                f"{', '.join(sorted(have)) or 'no metrics'} (run the sweep with the accuracy or fidelity "
                                f"metric, or pass --split-on KEY).")
    easy, hard, left_out = set(), set(), 0
    for example, values in baseline.items():
        key = next((k for k in keys if k in values), None)
        if key is None:
            continue  # an example this key says nothing about (another task's)
        if not key.startswith("fidelity.") and full and (full.get(example) or {}).get(key) != 1.0:
            left_out += 1
            continue
        (easy if values[key] == 1.0 else hard).add(example)
    return " / ".join(keys), easy, hard, left_out
