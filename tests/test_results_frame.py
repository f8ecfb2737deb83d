"""Results as data: ResultTable.to_pandas on a real sweep, and `resprune report --csv`."""

from __future__ import annotations

import csv

import pytest

from resprune.ablation import ResultTable
from resprune.cli import main as cli
from resprune.report import ROW_COLUMNS, flat_table, load_results

pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frame")
    spec = folder / "sweep.yaml"
    spec.write_text("base: resprune-llava15\nmodel: tiny:llava\nlimit: 2\nmax_new_tokens: 2\n"
                    "metrics: [fidelity, flops]\n"
                    "grid:\n  selector: [residual_energy, divprune]\n  budget: [8, 16]\n"
                    "  selector.params.alpha: [0.0, 0.75]\n")
    out = folder / "run"
    code = cli(["sweep", str(spec), "--quiet", "--out", str(out)])
    assert code == 0
    return out


def test_to_pandas_has_one_flat_row_per_cell(sweep):
    rows = load_results(sweep)
    frame = ResultTable(rows).to_pandas()
    assert len(frame) == len(rows)
    columns, _ = flat_table(rows)
    assert list(frame.columns) == columns + ["row"]
    assert list(frame.columns[: len(ROW_COLUMNS)]) == list(ROW_COLUMNS)
    assert {"selector.params.alpha", "fidelity.kl", "flops.ratio"} <= set(frame.columns)
    for _, r in frame.iterrows():  # every flat value is the row's own
        assert r["row"]["label"] == r["label"]
        assert r["budget"] == r["row"]["budget"] or (pd.isna(r["budget"]) and r["row"]["budget"] is None)
        for key, value in r["row"]["metrics"].items():
            assert r[key] == pytest.approx(value)
    pruned = frame[(frame["method"] != "full") & (frame["status"] == "done")]
    assert set(pruned["selector"]) == {"residual_energy", "divprune"}
    # the pivot a researcher does: a metric by selector x budget
    pivot = pruned.pivot_table(index="selector", columns="budget", values="flops.ratio", aggfunc="mean")
    assert pivot.shape == (2, 2) and (pivot[8] < pivot[16]).all()


def test_report_csv_writes_the_same_table(sweep, tmp_path):
    path = tmp_path / "table.csv"
    assert cli(["report", str(sweep), "--no-plots", "--csv", str(path)]) == 0
    with path.open() as f:
        written = list(csv.DictReader(f))
    frame = ResultTable(load_results(sweep)).to_pandas()
    assert list(written[0]) == [c for c in frame.columns if c != "row"]
    assert [w["label"] for w in written] == list(frame["label"])
    assert [float(w["fidelity.kl"]) if w["fidelity.kl"] else None for w in written] == [
        None if pd.isna(v) else pytest.approx(v) for v in frame["fidelity.kl"]]
