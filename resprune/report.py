"""Reports of a sweep: the paper's table layout in markdown, and metric-vs-budget plots.

``resprune report RUN_DIR`` reads ``RUN_DIR/results.jsonl`` (or, for a folder of lmms-eval
results, every ``*_results.json`` of the ``resprune`` model: ``resprune.lmms.results``) and
writes ``report.md`` and ``plots/`` beside it. Tables: the unpruned model first, then one block per budget with a
row per method, the metrics as columns (best of each block in bold) and the paper's
``Rel.`` column.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import InvalidInputError, MissingDependencyError
from .metric_traits import is_percent, lower_is_better
from .metrics import finite_number
from .runfiles import check_inside, replace_with, unique_slug, writable_file, writable_folder, write_atomic

__all__ = ["lower_is_better", "is_percent", "load_results", "results_table", "plot_metric_vs_budget", "write_report",
           "md_text", "csv_text"]


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: Any) -> Any:
    """A CSV cell that a spreadsheet cannot run: text starting like a formula (``=``, ``+``, ``-``,
    ``@``, tab, carriage return) gets a leading ``'``; numbers stay numbers."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def md_text(value: Any) -> str:
    """``value`` as text that cannot break a markdown table or list: one line, ``|`` escaped."""
    return " ".join(str(value).split()).replace("\\", "\\\\").replace("|", "\\|")


_ORDER = ("accuracy", "fidelity", "reconstruction", "relevance_mass", "flops", "vision_flops", "kv_cache", "latency",
          "memory")
_REQUIRED = ("model", "status", "method", "budget", "metrics")


def load_results(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``RUN_DIR/results.jsonl`` (or of the lmms-eval results under ``RUN_DIR``);
    ``InvalidInputError`` naming ``file:line`` if one is bad."""
    from .lmms.results import is_lmms_eval_dir, load_lmms_eval

    run = Path(run_dir)
    if not run.is_dir():
        raise InvalidInputError(f"run folder '{run}' not found: pass a folder written by `resprune sweep` "
                                "(or lmms-eval's --output_path).")
    if is_lmms_eval_dir(run):
        return load_lmms_eval(run)
    path = run / "results.jsonl"
    check_inside(run, path)
    if not path.is_file():
        raise InvalidInputError(f"{path} not found: is '{run_dir}' a folder written by `resprune sweep` "
                                "(or lmms-eval's --output_path)?")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{path}:{n}: not valid JSON ({exc.msg}).") from None
            if not isinstance(row, dict):
                raise InvalidInputError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}.")
            missing = [key for key in _REQUIRED if key not in row]
            if missing:
                raise InvalidInputError(f"{path}:{n}: row lacks {', '.join(repr(k) for k in missing)}.")
            problem = _row_problem(row)
            if problem:
                raise InvalidInputError(f"{path}:{n}: {problem}; not a row resprune writes (an edited or damaged "
                                        f"file): fix the line or run the sweep again.")
            for key, value in row["metrics"].items():
                if value is not None and not finite_number(value):
                    warnings.warn(f"{path}:{n}: metric '{key}' of {row.get('label') or row['method']} is {value}, not "
                                  f"a finite number; shown as {NOT_A_NUMBER}", RuntimeWarning, stacklevel=2)
            rows.append(row)
    return rows


_ROW_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "model": ((str,), "text"),
    "method": ((str,), "text"),
    "status": ((str,), "done, skipped or failed"),
    "budget": ((int, float, str, type(None)), "a number, text or null"),
    "metrics": ((dict,), "a mapping of metric keys to numbers"),
    "params": ((dict, type(None)), "a mapping"),
    "label": ((str, type(None)), "text"),
    "reason": ((str, type(None)), "text"),
    "selector": ((str, type(None)), "text"),
    "cell": ((str, type(None)), "text"),
    "examples": ((int, type(None)), "an int"),
    "rel": ((int, float, type(None)), "a number or null"),
    "intervals": ((dict, type(None)), "a mapping of metric keys to [low, high]"),
    "rel_interval": ((list, type(None)), "[low, high] or null"),
    "tests": ((dict, type(None)), "a mapping {against, p}"),
}


def _row_problem(row: dict[str, Any]) -> str | None:
    """What is wrong with the types of a ``results.jsonl`` row (``None``: nothing)."""
    for key, (types, expected) in _ROW_TYPES.items():
        if key in row and (not isinstance(row[key], types) or isinstance(row[key], bool)):
            return f"'{key}' is {type(row[key]).__name__} {json.dumps(row[key])[:40]}, expected {expected}"
    if row["status"] not in ("done", "skipped", "failed"):
        return f"'status' is {row['status']!r}, expected done, skipped or failed"
    for key, value in row["metrics"].items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"metric '{key}' is {type(value).__name__} {json.dumps(value)[:40]}, expected a number"
    tests = row.get("tests") or {}
    if tests and not (isinstance(tests.get("against"), str) and isinstance(tests.get("p"), dict)
                      and all(finite_number(p) for p in tests["p"].values())):
        return f"'tests' is {json.dumps(tests)[:40]}, expected {{\"against\": name, \"p\": {{metric: p-value}}}}"
    rel = row.get("rel_interval")
    if rel is not None and not (len(rel) == 2 and all(finite_number(v) for v in rel)):
        return f"'rel_interval' is {json.dumps(rel)[:40]}, expected [low, high]"
    for key, value in (row.get("intervals") or {}).items():
        if not (isinstance(value, list) and len(value) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            return f"interval '{key}' is {json.dumps(value)[:40]}, expected [low, high]"
    return None


def _one_model(rows: Sequence[dict[str, Any]], model: str | None) -> tuple[list[dict[str, Any]], str]:
    """The rows of ``model`` (or of the only model present) and that model's name."""
    models = sorted({str(r["model"]) for r in rows})
    if model is None:
        if len(models) > 1:
            raise InvalidInputError(f"the rows hold {len(models)} models ({', '.join(models)}): pass model=.")
        return list(rows), models[0] if models else ""
    if model not in models:
        raise InvalidInputError(f"no rows for model '{model}'; models present: {', '.join(models) or 'none'}.")
    return [r for r in rows if r["model"] == model], model


def _metric_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    names = {k for r in rows if r["status"] == "done" for k in r["metrics"]}

    def key(name: str) -> tuple[int, str]:
        head = name.split(".", 1)[0]
        return (_ORDER.index(head) if head in _ORDER else len(_ORDER), name)

    return sorted(names, key=key)


ALPHA = 0.05
"""The level at which a report marks a paired difference (after Holm's correction)."""
NOT_A_NUMBER = "n/a"
"""A table cell whose value was read but is not a finite number (NaN, Infinity; warned when read)."""
MISSING = "–"
"""A table cell with no value (the row did not measure that metric)."""


def _fmt(name: str, value: float | None) -> str:
    if value is None:
        return MISSING
    if not finite_number(value):  # NaN or infinite
        return NOT_A_NUMBER
    if is_percent(name):
        value = 100 * value
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"  # MME's 1862, not 1.86e+03


def _cell(name: str, row: dict[str, Any]) -> str:
    """A table cell: the row's value of ``name``, and its 95 % interval when the row has one
    (``62.1 (58.3–65.7)``)."""
    return _with_interval(name, row["metrics"].get(name), _interval(row, name))


def _with_interval(name: str, value: float | None, interval: tuple[float, float] | None) -> str:
    """``value`` formatted for metric ``name``, with its interval in brackets unless it has none or
    the bounds print as the value itself."""
    text = _fmt(name, value)
    if not finite_number(value) or interval is None:
        return text
    low, high = (_fmt(name, v) for v in interval)
    return text if low == high == text else f"{text} ({low}–{high})"


def budget_order(budget: Any) -> tuple[bool, float]:
    """The order of a table's budget blocks: token counts before ratios, larger first."""
    return isinstance(budget, float), -budget if isinstance(budget, (int, float)) else 0.0


def _budget_title(budget: Any) -> str:
    if isinstance(budget, float) and budget <= 1.0:
        return f"keep {100 * budget:.1f} %"
    return f"budget {budget}"


def results_table(rows: Sequence[dict[str, Any]], *, metrics: list[str] | None = None, model: str | None = None) -> str:
    """One model's results as a markdown table in the paper's layout (see the module docstring)."""
    rows, model = _one_model(rows, model)
    done = [r for r in rows if r["status"] == "done"]
    names = metrics or _metric_names(done)
    columns = ["method", *(md_text(n) for n in names), "Rel."]
    header = "| " + " | ".join(columns) + " |"
    shares = ", ".join(md_text(n) for n in sorted(filter(is_percent, names)))
    lower = ", ".join(md_text(n) for n in sorted(filter(lower_is_better, names)))
    about = [f"{len(done)} rows"] + ([f"shares in % ({shares})"] if shares else []) + \
        ([f"lower is better for {lower}"] if lower else []) + ["best per block in bold"] + \
        (["95 % intervals over the examples in brackets"] if any(r.get("intervals") for r in done) else [])
    lines = [f"**{md_text(model)}**: {'; '.join(about)}.", "", header, "|---|" + "---:|" * (len(columns) - 1)]
    shown: set[str] = set()  # the placeholders the table shows, explained under it

    def line(row: dict[str, Any], best: dict[str, float]) -> str:
        cells = []
        pvalues = (row.get("tests") or {}).get("p") or {}
        for name in names:
            value = row["metrics"].get(name)
            text = _cell(name, row)
            text = f"**{text}**" if finite_number(value) and best.get(name) == value else text
            if finite_number(pvalues.get(name)) and pvalues[name] < ALPHA:
                text += " †"
                shown.add("†")
            cells.append(text)
        rel, span = row.get("rel"), row.get("rel_interval")
        text = f"{100 * rel:.1f}" if finite_number(rel) else MISSING if rel is None else NOT_A_NUMBER
        if finite_number(rel) and span:
            low, high = (f"{100 * v:.1f}" for v in span)
            text = text if low == high == text else f"{text} ({low}–{high})"
        cells.append(text)
        shown.update(c for c in cells if c in (MISSING, NOT_A_NUMBER))
        return f"| {md_text(row['method'])} | " + " | ".join(cells) + " |"

    for row in (r for r in done if r["method"] == "full"):
        lines.append(line(row, {}))
    pruned = [r for r in done if r["method"] != "full"]
    budgets: list[Any] = []
    for r in pruned:
        if r["budget"] not in budgets:
            budgets.append(r["budget"])
    for budget in sorted(budgets, key=budget_order):
        block = sorted((r for r in pruned if r["budget"] == budget), key=lambda r: r["method"])
        best: dict[str, float] = {}
        if len(block) > 1:
            for name in names:
                vals = [r["metrics"][name] for r in block if finite_number(r["metrics"].get(name))]
                if vals and len(set(vals)) > 1:  # no bold where every method ties
                    best[name] = min(vals) if lower_is_better(name) else max(vals)
        lines.append(f"| **{md_text(_budget_title(budget))}** |" + " |" * (len(columns) - 1))
        lines.extend(line(r, best) for r in block)
    against = sorted({(r.get("tests") or {}).get("against") for r in done} - {None})
    legend = {MISSING: "not measured", NOT_A_NUMBER: "read, but not a finite number (a warning named it)",
              "†": f"differs from {' / '.join(md_text(a) for a in against)} at the same budget, p < {ALPHA} (paired "
                   f"over the examples: McNemar's test for 0/1 metrics, Wilcoxon's otherwise; Holm-corrected across "
                   f"the table)"}
    if shown:
        lines += ["", "; ".join(f"{mark}: {legend[mark]}" for mark in (MISSING, NOT_A_NUMBER, "†") if mark in shown)
                  + "."]
    other = [r for r in rows if r["status"] != "done"]
    if other:
        lines += ["", "Skipped and failed cells:", ""]
        lines += [f"- {md_text(r.get('label') or r['method'])}: {md_text(r['status'])} "
                  f"({md_text(r.get('reason') or 'no reason recorded')})" for r in other]
    noted = [r for r in done if r.get("reason")]
    if noted:
        lines += ["", "Notes:", ""]
        lines += [f"- {md_text(r.get('label') or r['method'])}: {md_text(r['reason'])}" for r in noted]
    return "\n".join(lines)


ROW_COLUMNS = ("model", "cell", "label", "method", "selector", "budget", "status", "reason", "examples", "rel")
"""The leading columns of the flat table: one per key of a result row (``results.jsonl``)."""


def flat_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Result rows as flat records: ``ROW_COLUMNS``, then one column per grid parameter (its
    dotted key, e.g. ``selector.params.alpha``; ``base`` for the config), then one per metric
    key (``fidelity.kl``), then the bounds of each metric's 95 % interval where rows have one
    (``fidelity.kl.ci_low``, ``fidelity.kl.ci_high``; Rel.'s: ``rel.ci_low``, ``rel.ci_high``), and
    the Holm-corrected p-value of each metric's paired test against the reference method
    (``fidelity.kl.p_vs_residual_energy``).
    Returns ``(columns, records)``; a missing value is ``None``."""
    params = sorted({k for r in rows for k in (r.get("params") or {}) if k not in ("selector", "budget")})
    metrics = _metric_names(rows)
    bounds = [k for k in metrics if any(k in (r.get("intervals") or {}) for r in rows)]
    against = sorted({(r.get("tests") or {}).get("against") for r in rows} - {None})
    tested = [(k, a) for a in against for k in metrics
              if any(k in ((r.get("tests") or {}).get("p") or {}) and r["tests"]["against"] == a for r in rows)]
    records = []
    for r in rows:
        record: dict[str, Any] = {c: r.get(c) for c in ROW_COLUMNS}
        if record["selector"] is None and r.get("method") != "full":  # rows written before `selector` existed
            record["selector"] = (r.get("params") or {}).get("selector", r.get("method"))
        record.update({k: (r.get("params") or {}).get(k) for k in params})
        record.update({k: (r.get("metrics") or {}).get(k) for k in metrics})
        for k in bounds:
            low, high = (r.get("intervals") or {}).get(k) or (None, None)
            record[f"{k}.ci_low"], record[f"{k}.ci_high"] = low, high
        tests = r.get("tests") or {}
        for k, a in tested:
            record[f"{k}.p_vs_{a}"] = (tests.get("p") or {}).get(k) if tests.get("against") == a else None
        records.append(record)
    limits = [f"{k}.ci_{side}" for k in bounds for side in ("low", "high")]
    if any(r.get("rel_interval") for r in rows):
        limits += ["rel.ci_low", "rel.ci_high"]
        for r, record in zip(rows, records):
            record["rel.ci_low"], record["rel.ci_high"] = r.get("rel_interval") or (None, None)
    return list(ROW_COLUMNS) + params + metrics + limits + [f"{k}.p_vs_{a}" for k, a in tested], records


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """The flat table (``flat_table``) as CSV, written atomically."""
    columns, records = flat_table(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[csv_text(c) for c in columns], lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({csv_text(k): "" if v is None else csv_text(v) for k, v in record.items()})
    path = Path(path)
    write_atomic(path, buffer.getvalue())
    return path


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError('plots need matplotlib: pip install "resprune[report]" '
                                     "(or `resprune report --no-plots`)") from None
    return plt


def _interval(row: dict[str, Any], metric: str) -> tuple[float, float] | None:
    """A row's 95 % interval of ``metric`` (``None``: it has none)."""
    band = (row.get("intervals") or {}).get(metric)
    if isinstance(band, list) and len(band) == 2 and all(finite_number(v) for v in band):
        return float(band[0]), float(band[1])
    return None


def plot_metric_vs_budget(rows: Sequence[dict[str, Any]], metric: str, path_stem: str | Path, *,
                          model: str | None = None) -> list[Path]:
    """Plot ``metric`` against the budget, one line per method; write PNG and SVG.

    Int budgets and ratio budgets go to separate figures (``<stem>_k``, ``<stem>_ratio``)
    when a model has both. Where the rows carry 95 % intervals, each line gets a shaded band (and
    the unpruned model's level one too). Returns the files written.
    """
    plt = _pyplot()
    rows, model = _one_model(rows, model)
    rows = [r for r in rows if r["status"] == "done"]
    full = next((r for r in rows if r["method"] == "full" and finite_number(r["metrics"].get(metric))), None)
    pruned = [r for r in rows if r["method"] != "full" and finite_number(r["metrics"].get(metric))
              and finite_number(r["budget"])]
    kinds = {"k": [r for r in pruned if isinstance(r["budget"], int)],
             "ratio": [r for r in pruned if isinstance(r["budget"], float)]}
    kinds = {k: v for k, v in kinds.items() if v}
    written: list[Path] = []
    for kind, group in kinds.items():
        stem = Path(str(path_stem) + (f"_{kind}" if len(kinds) > 1 else ""))
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in sorted({r["method"] for r in group}):
            mine = sorted((r for r in group if r["method"] == method), key=lambda r: r["budget"])
            xs = [r["budget"] for r in mine]
            (line,) = ax.plot(xs, [r["metrics"][metric] for r in mine], marker="o", label=method)
            bands = [_interval(r, metric) for r in mine]
            if all(band is not None for band in bands):  # the 95 % interval of each point, as a band
                ax.fill_between(xs, [b[0] for b in bands], [b[1] for b in bands], color=line.get_color(), alpha=0.15,
                                linewidth=0)
        if full is not None:
            ax.axhline(full["metrics"][metric], linestyle="--", color="gray", label="full (unpruned)")
            band = _interval(full, metric)
            if band is not None:
                ax.axhspan(band[0], band[1], color="gray", alpha=0.1, linewidth=0)
        budgets = [r["budget"] for r in group]
        if min(budgets) > 0 and max(budgets) / min(budgets) > 10:
            ax.set_xscale("log")
        ax.set_xlabel("tokens kept per image" if kind == "k" else "share of tokens kept")
        ax.set_ylabel(metric + (" (lower is better)" if lower_is_better(metric) else ""))
        ax.set_title(f"{model}: {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        stem.parent.mkdir(parents=True, exist_ok=True)
        for ext in ("png", "svg"):
            path = stem.with_name(stem.name + f".{ext}")
            replace_with(path, lambda tmp, ext=ext: fig.savefig(tmp, format=ext))
            written.append(path)
        plt.close(fig)
    return written


def _check_examples(run: Path, rows: Sequence[dict[str, Any]], examples: Sequence[Any], option: str) -> None:
    """``InvalidInputError`` when the folder keeps no per-example results to compute ``option`` from."""
    done = [e for r, e in zip(rows, examples) if r["status"] == "done" and r["method"] != "full"]
    if not any(done):
        raise InvalidInputError(f"{option}: '{run}' holds no per-example results (cells/<id>/examples.rank*.jsonl and "
                                f"full.examples.jsonl, written by `resprune sweep`; lmms-eval folders need "
                                f"--log_samples); run the sweep again in this folder (finished cells are kept).")


def write_report(run_dir: str | Path, *, metrics: list[str] | None = None, plots: bool = True,
                 csv_path: str | Path | None = None, against: str | None = None, split: str | None = None,
                 split_on: str | None = None) -> Path:
    """Write ``RUN_DIR/report.md`` (and ``RUN_DIR/plots/``; the flat table to ``csv_path`` if
    given); return the report's path.

    ``against``: test every row against this method (a row's method or selector) instead of the
    one the run chose, from the per-example results in the folder. ``split``: add VTC-Bench's
    difficulty split by this baseline (``pool``, ``downsample``, ...; ``split_on``: the 0/1 metric
    saying it got an example, see ``resprune.comparisons.split_on``)."""
    from .comparisons import examples_of, paired_tests
    from .lmms.results import HEADLINE, is_lmms_eval_dir, lmms_columns
    from .lmms.samples import headline_tests, samples_of

    run = Path(run_dir)
    rows = load_results(run)
    examples = []
    if against or split:
        examples = [samples_of(run, r) for r in rows] if is_lmms_eval_dir(run) else examples_of(run, rows)
        _check_examples(run, rows, examples, "--against" if against else "--split")
    if against:
        paired_tests(rows, examples, against)
        for row in rows:
            headline_tests(row, HEADLINE)
        if not any(r.get("tests") for r in rows):
            raise InvalidInputError(f"--against {against}: no done row of '{run}' is '{against}' (a row's method or "
                                    f"selector) at a budget where other rows ran; rows: "
                                    f"{', '.join(sorted({r['method'] for r in rows if r['method'] != 'full'}))}.")
    check_inside(run, run / "report.md")
    writable_file(run / "report.md", "report")  # every output checked before the first is written
    if csv_path is not None:
        writable_file(csv_path, "--csv")
    if plots:
        check_inside(run, run / "plots")
        writable_folder(run / "plots", "plots folder")
    if csv_path is not None:
        write_csv(rows, csv_path)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")}
    lmms = is_lmms_eval_dir(run)
    source = f"the lmms-eval results under `{run}`" if lmms else f"`{run / 'results.jsonl'}`"
    lines = ["# Ablation report", "",
             f"From {source}: {counts['done']} rows done, {counts['skipped']} skipped, "
             f"{counts['failed']} failed.", ""]
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        names = metrics or (lmms_columns(mine) if lmms else None)
        lines += [f"## {md_text(model)}", "", results_table(rows, metrics=names, model=model), ""]
        if lmms:
            from .lmms.samples import interval_notes

            notes = interval_notes(mine, HEADLINE)
            lines += [*(f"- {md_text(note)}" for note in notes), ""] if notes else []
        if split:
            index = [i for i, r in enumerate(rows) if r["model"] == model]
            lines += [f"### Difficulty split by {md_text(split)}", "",
                      "VTC-Bench's split: the examples the baseline at the same budget already gets (easy) and the "
                      "rest (hard); each cell: mean (95 % interval) over that group.", "",
                      split_table([rows[i] for i in index], [examples[i] for i in index], split, metrics=metrics,
                                  on=split_on), ""]
        if plots:
            names = names or _metric_names(mine)
            for name in names:
                stem = run / "plots" / unique_slug(f"{model}_{name}")  # org/m and org:m: two files
                for path in plot_metric_vs_budget(rows, name, stem, model=model):
                    if path.suffix == ".png":
                        alt = md_text(name).replace("[", "(").replace("]", ")")
                        lines.append(f"![{alt}](plots/{path.name})")
            lines.append("")
    out = run / "report.md"
    write_atomic(out, "\n".join(lines))
    return out


def split_table(rows: Sequence[dict[str, Any]], examples: Sequence[dict[Any, dict[str, float]]], baseline: str, *,
                metrics: Sequence[str] | None = None, on: str | None = None, seed: int = 0) -> str:
    """Markdown: per budget, each done row's mean (95 % interval) of ``metrics`` on the examples
    the ``baseline`` row (its method or selector) of that budget already gets (easy) and on the
    rest (hard), with their counts."""
    from .comparisons import _matches, budget_key, metric_interval, split_on

    full = next((ex for row, ex in zip(rows, examples) if row["method"] == "full"), {})
    blocks: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if row["status"] == "done" and row["method"] != "full":
            blocks.setdefault(budget_key(row), []).append(i)
    if not any(_matches(rows[i], baseline) for block in blocks.values() for i in block):
        names = sorted({rows[i]["method"] for block in blocks.values() for i in block})
        raise InvalidInputError(f"--split {baseline}: no done row of this run is '{baseline}' (method or selector); "
                                f"rows: {', '.join(names) or 'none'}. Add it to the sweep's grid.")
    lines = []
    for _, block in sorted(blocks.items(), key=lambda item: budget_order(rows[item[1][0]]["budget"])):
        base = next((i for i in block if _matches(rows[i], baseline)), None)
        if base is None:
            lines += [f"*budget {md_text(rows[block[0]]['budget'])}: no '{md_text(baseline)}' row at this budget.*", ""]
            continue
        if not examples[base]:
            lines += [f"*budget {md_text(rows[base]['budget'])}: the run folder holds no per-example results of "
                      f"'{md_text(baseline)}'.*", ""]
            continue
        key, easy, hard, left_out = split_on(examples[base], full, on)
        have = rows[base]["metrics"]
        shown = list(metrics) if metrics else \
            [k for k in ("accuracy.vqa_score", "accuracy.exact_match") if k in have][:1] + \
            [k for k in ("fidelity.kl", "fidelity.top1_agree") if k in have]
        if not shown:  # other metrics (lmms-eval tasks): what the split is on, and the baseline's other per-example ones
            shown = sorted({k for values in examples[base].values() for k in values})[:4]
        rule = (f"among the examples the full model gets right by `{key}` ({left_out} others left out), "
                if not key.startswith("fidelity.") else "") + f"easy: '{md_text(baseline)}' has `{key}` = 1"
        lines += [f"**budget {md_text(rows[base]['budget'])}**: {rule}; easy {len(easy)}, hard {len(hard)} examples.", ""]
        header = ["method"] + [f"{md_text(m)}, easy" for m in shown] + [f"{md_text(m)}, hard" for m in shown]
        lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        empty = not easy or not hard
        for i in sorted(block, key=lambda i: rows[i]["method"]):
            cells = []
            for group in (easy, hard):
                for m in shown:
                    values = [v[m] for e, v in examples[i].items()  # the run's order, as its intervals
                              if e in group and m in v and finite_number(v[m])]
                    if not values:
                        cells.append(MISSING)
                        continue
                    ci = metric_interval(m, values, seed=seed)
                    cells.append(_with_interval(m, ci.estimate, (ci.low, ci.high)))
            lines.append(f"| {md_text(rows[i]['method'])} | " + " | ".join(cells) + " |")  # easy ones, then hard
        lines += ["", f"{MISSING}: no example in that group.", ""] if empty else [""]
    return "\n".join(lines).rstrip() + "\n"
