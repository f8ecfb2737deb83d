"""``auto`` picks the fastest CPU method at the paper's budgets: checked against the times the
selection benchmark measured (``python benchmarks/bench_selection.py --auto --calibration
benchmarks/results/auto-cpu.json``), so the rule and the measurement cannot drift apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resprune.linalg import choose_method

CALIBRATION = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "auto-cpu.json"
TOLERANCE = 1.10  # within 10 % of the fastest method measured


def shapes():
    return json.loads(CALIBRATION.read_text())["shapes"]


def test_the_calibration_covers_the_table_i_budgets():
    covered = {(s["n"], s["k"]) for s in shapes()}
    assert {(n, k) for n in (576, 2880) for k in (64, 128, 192)} <= covered


@pytest.mark.parametrize("shape", shapes(), ids=lambda s: f"N={s['n']},k={s['k']}")
def test_auto_chooses_a_method_within_10_percent_of_the_fastest_measured(shape):
    chosen = choose_method(shape["n"], shape["d"], shape["k"], device="cpu")
    best = min(shape["ms"].values())
    assert shape["ms"][chosen] <= TOLERANCE * best, (chosen, shape["ms"])
