"""Reports: the paper's table layout, plots, and errors."""

from __future__ import annotations

import json
import sys

import pytest

from resprune.errors import InvalidInputError, MissingDependencyError
from resprune.report import load_results, plot_metric_vs_budget, results_table, write_report


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
