"""Reports: the paper's table layout, plots, and errors."""

from __future__ import annotations

import json
import sys

import pytest

from resprune.errors import InvalidInputError, MissingDependencyError
from resprune.report import load_results, plot_metric_vs_budget, results_table, write_report
from resprune.runfiles import unique_slug


def row(method, budget, metrics, *, status="done", reason=None, model="m", rel=None):
    return {"cell": f"{method}-{budget}", "label": f"{method} budget={budget}", "model": model, "status": status,
            "reason": reason, "method": method, "budget": budget, "params": {}, "examples": 2, "metrics": metrics,
            "rel": rel}


ROWS = [
    row("full", None, {"accuracy.vqa_score": 0.5, "flops.ratio": 1.0}, rel=1.0),
    row("dpp", 64, {"accuracy.vqa_score": 0.4, "fidelity.kl": 0.2, "flops.ratio": 0.2}, rel=0.8),
    row("residual_energy", 64, {"accuracy.vqa_score": 0.45, "fidelity.kl": 0.1, "flops.ratio": 0.2}, rel=0.9),
    row("residual_energy", 128, {"accuracy.vqa_score": 0.5, "fidelity.kl": 0.05, "flops.ratio": 0.3}, rel=1.0),
    row("divprune", 64, {}, status="skipped", reason="selector 'divprune' has no parameter 'alpha'"),
    row("broken", 64, {}, status="failed", reason="RuntimeError: boom"),
]


def test_table_layout_blocks_bold_best_and_rel():
    lines = results_table(ROWS).splitlines()
    assert lines[2] == "| method | accuracy.vqa_score | fidelity.kl | flops.ratio | Rel. |"
    body = lines[4:]
    assert body[0] == "| full | 50 | – | 1 | 100.0 |"
    assert body[1].startswith("| **budget 128** |")
    assert body[2] == "| residual_energy | 50 | 0.05 | 0.3 | 100.0 |"  # a block of one: nothing to bold
    assert body[3].startswith("| **budget 64** |")
    assert body[4] == "| dpp | 40 | 0.2 | 0.2 | 80.0 |"
    assert body[5] == "| residual_energy | **45** | **0.1** | 0.2 | 90.0 |"  # kl: lower is better; tie: no bold
    text = "\n".join(lines)
    assert "divprune budget=64: skipped (selector 'divprune' has no parameter 'alpha')" in text
    assert "broken budget=64: failed (RuntimeError: boom)" in text


def test_one_table_per_model_and_ratio_budgets(tmp_path):
    rows = ROWS + [row("full", None, {"flops.ratio": 1.0}, model="q"), row("dpp", 0.25, {"flops.ratio": 0.3}, model="q"),
                   row("dpp", 16, {"flops.ratio": 0.1}, model="q")]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = write_report(tmp_path).read_text()
    assert "## m" in report and "## q" in report and "**keep 25.0 %**" in report
    files = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert "q_flops.ratio_k.png" in files and "q_flops.ratio_ratio.svg" in files  # ints and ratios apart
    png = (tmp_path / "plots" / "m_fidelity.kl.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert "<svg" in (tmp_path / "plots" / "m_fidelity.kl.svg").read_text()
    assert "![fidelity.kl](plots/m_fidelity.kl.png)" in report


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(InvalidInputError, match="results.jsonl not found"):
        load_results(tmp_path)
    (tmp_path / "results.jsonl").write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(InvalidInputError, match=r"results.jsonl:2"):
        load_results(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"resprune\[report\]"):
        plot_metric_vs_budget(ROWS, "fidelity.kl", tmp_path / "x")


def test_header_line_documents_percent_and_lower_is_better():
    header = results_table(ROWS).splitlines()[0]
    assert header == ("**m**: 4 rows; shares in % (accuracy.vqa_score); lower is better for fidelity.kl, "
                      "flops.ratio; best per block in bold.")


def test_ties_nan_and_ratio_blocks():
    rows = [row("full", None, {"accuracy.vqa_score": 0.5}, rel=1.0),
            row("a", 0.25, {"accuracy.vqa_score": 0.4, "fidelity.kl": float("nan")}, rel=0.8),
            row("b", 0.25, {"accuracy.vqa_score": 0.4, "fidelity.kl": 0.3}, rel=float("nan")),
            row("c", 0.25, {"accuracy.vqa_score": 0.3, "fidelity.kl": 0.5}, rel=None),
            row("a", 32, {"accuracy.vqa_score": 0.2}, rel=0.4)]
    body = results_table(rows).splitlines()[4:]
    assert body == [
        "| full | 50 | – | 100.0 |",
        "| **budget 32** | | | |",
        "| a | 20 | – | 40.0 |",
        "| **keep 25.0 %** | | | |",
        "| a | **40** | n/a | 80.0 |",  # NaN: shown as n/a, never best
        "| b | **40** | **0.3** | n/a |",  # a shared best is bold in both rows
        "| c | 30 | 0.5 | – |",  # None: not measured
        "",
        "–: not measured; n/a: read, but not a finite number (a warning named it).",
    ]


def test_separate_tables_per_model():
    rows = ROWS + [row("full", None, {"flops.ratio": 1.0}, model="q", rel=1.0),
                   row("dpp", 16, {"flops.ratio": 0.1}, model="q", rel=None)]
    with pytest.raises(InvalidInputError, match=r"2 models \(m, q\): pass model="):
        results_table(rows)
    with pytest.raises(InvalidInputError, match="no rows for model 'x'"):
        results_table(rows, model="x")
    q = results_table(rows, model="q").splitlines()
    assert q[0].startswith("**q**: 2 rows;")
    assert q[2:] == ["| method | flops.ratio | Rel. |", "|---|---:|---:|", "| full | 1 | 100.0 |",
                     "| **budget 16** | | |", "| dpp | 0.1 | – |", "", "–: not measured."]
    assert "residual_energy" not in results_table(rows, model="q")
    assert "dpp | 0.1" not in results_table(rows, model="m")


def test_plot_axes_and_svg_root(tmp_path, monkeypatch):
    import xml.etree.ElementTree as ET

    import matplotlib.pyplot as plt

    figs = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figs.append(fig), close(fig)))
    rows = [row("full", None, {"accuracy.vqa_score": 0.5}, model="tiny:llava"),
            row("dpp", 8, {"accuracy.vqa_score": 0.2}, model="tiny:llava"),
            row("dpp", 192, {"accuracy.vqa_score": 0.45}, model="tiny:llava"),
            row("random", 8, {"accuracy.vqa_score": 0.1}, model="tiny:llava")]
    paths = plot_metric_vs_budget(rows, "accuracy.vqa_score", tmp_path / "p")
    assert [p.name for p in paths] == ["p.png", "p.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ET.parse(paths[1]).getroot().tag == "{http://www.w3.org/2000/svg}svg"
    (ax,) = figs[0].axes
    assert ax.get_xscale() == "log"  # 8..192 spans more than 10x
    assert ax.get_title() == "tiny:llava: accuracy.vqa_score"
    assert ax.get_xlabel() == "tokens kept per image" and ax.get_ylabel() == "accuracy.vqa_score"
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["dpp"].get_xdata()) == [8, 192] and lines["dpp"].get_marker() == "o"
    assert lines["full (unpruned)"].get_linestyle() == "--"
    assert list(lines["full (unpruned)"].get_ydata()) == [0.5, 0.5]


def test_report_without_matplotlib(tmp_path, monkeypatch):
    rows = [row("full", None, {"fidelity.kl": 0.0}, model="tiny:llava"), row("dpp", 8, {"fidelity.kl": 0.2},
                                                                               model="tiny:llava")]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = write_report(tmp_path, plots=False).read_text()
    assert "## tiny:llava" in report and "1 skipped" not in report and "2 rows done, 0 skipped, 0 failed" in report
    assert "![" not in report and not (tmp_path / "plots").exists()
    with pytest.raises(MissingDependencyError, match=r'pip install "resprune\[report\]"'):
        write_report(tmp_path)
    monkeypatch.undo()
    report = write_report(tmp_path).read_text()
    stem = unique_slug("tiny:llava_fidelity.kl")
    assert stem.startswith("tiny_llava_fidelity.kl-")  # a hash of the name: tiny/llava would get another
    assert f"![fidelity.kl](plots/{stem}.png)" in report
    assert (tmp_path / "plots" / f"{stem}.svg").is_file()


def test_bad_inputs_name_file_and_line(tmp_path):
    with pytest.raises(InvalidInputError, match="run folder .*nope.* not found"):
        load_results(tmp_path / "nope")
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n[1, 2]\n")
    with pytest.raises(InvalidInputError, match=r"results.jsonl:3: expected a JSON object, got list"):
        load_results(tmp_path)
    path.write_text(json.dumps({"model": "m", "status": "done"}) + "\n")
    with pytest.raises(InvalidInputError, match=r"results.jsonl:1: row lacks 'method', 'budget', 'metrics'"):
        load_results(tmp_path)


def test_a_third_party_metric_says_how_it_is_read(plugin_host):
    import resprune.strategies.metrics as builtin_metrics
    from resprune import hookimpl
    from resprune.metrics import Metric

    class Error(Metric):
        name = "error_rate"
        lower_is_better = frozenset({"err"})
        percent = frozenset({"err"})

        def compute(self, example):
            return {}

    class Plugin:
        @staticmethod
        @hookimpl
        def resprune_register_metrics(register):
            register(Error)

    plugin_host(builtin_metrics, Plugin)
    rows = [row("a", 64, {"error_rate.err": 0.25}), row("b", 64, {"error_rate.err": 0.5})]
    lines = results_table(rows).splitlines()
    assert "shares in % (error_rate.err)" in lines[0] and "lower is better for error_rate.err" in lines[0]
    assert "| a | **25** |" in "\n".join(lines) and "| b | 50 |" in "\n".join(lines)  # the smaller one is best


def test_a_paired_difference_is_marked_and_explained():
    rows = [row("full", None, {"fidelity.kl": 0.0}, rel=1.0),
            row("resprune", 16, {"fidelity.kl": 0.2}, rel=0.9),
            {**row("random", 16, {"fidelity.kl": 0.5}, rel=0.7), "tests": {"against": "residual_energy",
                                                                          "p": {"fidelity.kl": 0.01}}},
            {**row("uniform", 16, {"fidelity.kl": 0.3}, rel=0.8), "tests": {"against": "residual_energy",
                                                                           "p": {"fidelity.kl": 0.2}}}]
    text = results_table(rows)
    assert "| random | 0.5 † | 70.0 |" in text and "| uniform | 0.3 | 80.0 |" in text
    assert "†: differs from residual_energy at the same budget, p < 0.05" in text


def test_plots_shade_the_95_percent_interval_of_each_point(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    figs = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figs.append(fig), close(fig)))
    rows = [{**row("full", None, {"fidelity.kl": 0.0}), "intervals": {"fidelity.kl": [0.0, 0.0]}},
            {**row("dpp", 8, {"fidelity.kl": 0.2}), "intervals": {"fidelity.kl": [0.1, 0.35]}},
            {**row("dpp", 32, {"fidelity.kl": 0.1}), "intervals": {"fidelity.kl": [0.05, 0.2]}},
            row("random", 8, {"fidelity.kl": 0.3})]  # no interval: no band
    plot_metric_vs_budget(rows, "fidelity.kl", tmp_path / "p")
    (ax,) = figs[0].axes
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert (ys.min(), ys.max()) == (pytest.approx(0.05), pytest.approx(0.35))
