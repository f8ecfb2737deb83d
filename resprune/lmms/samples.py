"""lmms-eval's per-sample logs (``--log_samples``) as per-example results of report rows.

Beside ``DIR/<model>/<date>_results.json`` lmms-eval writes ``<date>_samples_<task>.jsonl``, one
line per document with the task's per-document metrics. Where a task's score is a mean over its
documents (``PER_SAMPLE``), those lines give each row the same 95 % intervals and paired tests as
a sweep (``resprune.comparisons``). Where it is not (``NOT_PER_SAMPLE``: MME sums per-category
scores, GPT-judged tasks), the report says so instead of inventing an interval.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..metrics import finite_number
from ..runfiles import check_inside, read_jsonl

__all__ = ["PER_SAMPLE", "NOT_PER_SAMPLE", "samples_of", "headline_of", "row_intervals", "headline_tests",
           "interval_notes"]

_POPE = ("pope_accuracy",)
PER_SAMPLE: dict[str, tuple[str, ...]] = {
    "gqa": ("exact_match",),
    "scienceqa_img": ("exact_match",),
    "textvqa_val": ("exact_match",),
    "vizwiz_vqa_val": ("exact_match",),
    "vqav2_val": ("exact_match",),
    "pope": _POPE,
    "pope_pop": _POPE,
    "pope_adv": _POPE,
    "pope_random": _POPE,
    "resprune_samples": ("exact_match", "vqa_score"),
}
"""Task -> its metrics whose score is the mean of the per-document values lmms-eval logs (a logged
mapping's ``score``: POPE's accuracy). POPE's headline F1 is not such a mean: its interval is
``<task>.pope_accuracy``'s."""

_GPT = "a GPT judge's score, not a mean of per-sample values a bootstrap could resample"
NOT_PER_SAMPLE: dict[str, str] = {
    "mme": "MME's score sums per-category accuracies (and accuracy+ over image pairs), not a mean over samples",
    "mmbench_en_dev": _GPT,
    "mmvet": _GPT,
    "llava_in_the_wild": _GPT,
}
"""Tasks whose score no per-sample mean gives, and why (the report prints it)."""


def _samples_file(result: Path, task: str) -> Path:
    return result.with_name(result.name.removesuffix("_results.json") + f"_samples_{task}.jsonl")


def _value(value: Any) -> float | None:
    if isinstance(value, dict):
        value = value.get("score")
    return float(value) if finite_number(value) else None


def samples_of(root: str | Path, row: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{"<task>:<doc_id>": {"<task>.<metric>": value}}`` for the per-sample tasks of ``row`` (an
    lmms-eval row of ``load_lmms_eval``), from the sample logs beside its result files, a newer
    file's line replacing an older one's; ``{}`` without logs."""
    out: dict[str, dict[str, float]] = {}
    for source in row.get("sources", ()):  # oldest first
        result = Path(source)
        for task in row.get("tasks", ()):
            metrics = PER_SAMPLE.get(task)
            path = _samples_file(result, task)
            if metrics is None or not path.is_file():
                continue
            check_inside(root, path)
            for n, line in read_jsonl(path):
                if not isinstance(line, dict) or "doc_id" not in line:
                    raise _bad(path, n, "a JSON object with 'doc_id'")
                values = {}
                for metric in metrics:
                    if metric in line:
                        value = _value(line[metric])
                        if value is None:
                            warnings.warn(f"{path}:{n}: {metric} is {json.dumps(line[metric], default=str)[:40]}, "
                                          f"not a number; that sample is left out of the intervals", RuntimeWarning,
                                          stacklevel=2)
                            continue
                        values[f"{task}.{metric}"] = value
                if values:
                    out[f"{task}:{line['doc_id']}"] = values
    return out


def headline_of(task: str, headline: dict[str, tuple[tuple[str, ...], float]]) -> tuple[str, float] | None:
    """``("<task>.<metric>", scale)`` when ``task``'s headline score is one per-sample metric times
    ``scale`` (GQA's accuracy in %), else ``None`` (POPE's F1, MME's sum)."""
    names, scale = headline.get(task, ((), 1.0))
    if len(names) == 1 and names[0] in PER_SAMPLE.get(task, ()):
        return f"{task}.{names[0]}", scale
    return None


def _bad(path: Path, n: int, expected: str) -> InvalidInputError:
    return InvalidInputError(f"{path}:{n}: expected {expected}; not a line lmms-eval's --log_samples writes.")


def row_intervals(examples: dict[str, dict[str, float]], headline: dict[str, tuple[tuple[str, ...], float]], *,
                  seed: int = 0) -> dict[str, list[float]]:
    """Per metric key of the samples, the 95 % interval of its mean (``resprune.comparisons.intervals``:
    Wilson's for 0/1 values, a seeded bootstrap otherwise), and each task's headline score's: its
    metric's, scaled."""
    from ..comparisons import intervals

    out = intervals(list(examples.values()), seed=seed)
    for task in {key.partition(".")[0] for key in out}:
        found = headline_of(task, headline)
        if found is not None and found[0] in out:
            out[task] = [found[1] * v for v in out[found[0]]]
    return dict(sorted(out.items()))


def headline_tests(row: dict[str, Any], headline: dict[str, tuple[tuple[str, ...], float]]) -> None:
    """Give each task's headline column the p-value of the per-sample metric it scales."""
    tests = (row.get("tests") or {}).get("p") or {}
    for task in row.get("tasks", ()):
        found = headline_of(task, headline)
        if found is not None and found[0] in tests:
            tests[task] = tests[found[0]]


def interval_notes(rows: list[dict[str, Any]], headline: dict[str, tuple[tuple[str, ...], float]]) -> list[str]:
    """What the report says about tasks without intervals: not per sample, or no sample logs."""
    tasks = sorted({t for r in rows for t in r.get("tasks", ())})
    notes = [f"{task}: no interval or test, {NOT_PER_SAMPLE[task]}." for task in tasks if task in NOT_PER_SAMPLE]
    notes += [f"{task}: its column ({' + '.join(headline[task][0])}) has no interval, not being a mean over samples; "
              f"{', '.join(f'{task}.{m}' for m in PER_SAMPLE[task])} has one (in the CSV)." for task in tasks
              if task in PER_SAMPLE and task in headline and headline_of(task, headline) is None
              and any(task in r.get("tasks", ()) and r.get("intervals") for r in rows)]
    unlogged = [t for t in tasks if t in PER_SAMPLE
                and any(t in r.get("tasks", ()) and t not in (r.get("intervals") or {}) for r in rows)]
    if unlogged:
        notes.append(f"{', '.join(unlogged)}: no interval or test where a run was not made with --log_samples "
                     f"(lmms-eval writes the per-sample files they are computed from).")
    other = [t for t in tasks if t not in PER_SAMPLE and t not in NOT_PER_SAMPLE]
    if other:
        notes.append(f"{', '.join(other)}: no interval or test (resprune does not know whether their scores are means "
                     f"over samples).")
    return notes
