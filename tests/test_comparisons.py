"""Report-time comparisons from a run folder's per-example results: `--against`, Rel. with its
interval, and VTC-Bench's difficulty split (`--split`)."""

from __future__ import annotations

import json
import re

import pytest
from scipy import stats

import resprune
from resprune.cli import main as cli
from resprune.comparisons import FULL_EXAMPLES, examples_of, split_on
from resprune.errors import InvalidInputError
from resprune.metrics import Metric
from resprune.report import load_results
from resprune.stats import ratio_interval

from test_ablation import study


def lines_of(path):
    """Record -> metrics, in the run's example order."""
    lines = sorted(map(json.loads, path.read_text().splitlines()), key=lambda line: line["index"])
    return {line["record"]: line["metrics"] for line in lines}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """ResPrune, random and pool at one budget on 6 bundled examples (tiny LLaVA-1.5)."""
    out = tmp_path_factory.mktemp("run")
    study({"selector": ["residual_energy", "random", "pool"], "budget": [16]}, limit=6,
          metrics=["accuracy", "fidelity"]).run(out)
    return out


def holm(pvalues):
    order = sorted(pvalues, key=pvalues.get)
    out, running = {}, 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[key]))
        out[key] = running
    return out


def test_against_recomputes_the_paired_tests_from_the_examples_the_folder_holds(run):
    rows = load_results(run)
    assert (run / FULL_EXAMPLES).is_file()
    assert all(r["tests"]["against"] == "residual_energy" for r in rows if r.get("tests"))
    assert cli(["report", str(run), "--no-plots", "--against", "random", "--csv", str(run / "t.csv")]) == 0
    per = {r["method"]: lines_of(next((run / "cells" / r["cell"]).glob("examples.rank*.jsonl")))
           for r in rows if r["method"] != "full"}
    raw = {}
    for method in ("residual_energy", "pool"):
        a = [per[method][k]["fidelity.kl"] for k in sorted(per["random"])]
        b = [per["random"][k]["fidelity.kl"] for k in sorted(per["random"])]
        raw[method] = stats.wilcoxon(a, b).pvalue
    want = holm(raw)
    header, *records = (run / "t.csv").read_text().splitlines()
    columns = header.split(",")
    assert "fidelity.kl.p_vs_random" in columns and not any("p_vs_residual_energy" in c for c in columns)
    got = {r.split(",")[columns.index("method")]: r.split(",")[columns.index("fidelity.kl.p_vs_random")] for r in records}
    for method in ("residual_energy", "pool"):
        assert float(got[method]) == pytest.approx(want[method])
    assert got["random"] == "" and got["full"] == ""
    stored = next(r for r in load_results(run) if r["method"] == "random")
    assert stored["tests"]["against"] == "residual_energy"  # results.jsonl is left as the run wrote it


def test_the_split_divides_the_examples_by_the_baseline_and_shows_each_method_on_both(run):
    assert cli(["report", str(run), "--no-plots", "--split", "pool", "--split-on", "fidelity.top1_agree"]) == 0
    text = (run / "report.md").read_text()
    section = text[text.index("### Difficulty split by pool"):]
    rows = load_results(run)
    pool = next(r for r in rows if r["method"] == "pool")
    pool_lines = lines_of(next((run / "cells" / pool["cell"]).glob("examples.rank*.jsonl")))
    easy = sorted(k for k, v in pool_lines.items() if v["fidelity.top1_agree"] == 1.0)
    hard = sorted(k for k, v in pool_lines.items() if v["fidelity.top1_agree"] == 0.0)
    assert f"easy {len(easy)}, hard {len(hard)} examples" in section and len(easy) + len(hard) == 6
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1  # one column count: a well-formed table
    res = next(r for r in rows if r["method"] == "residual_energy")
    mine = lines_of(next((run / "cells" / res["cell"]).glob("examples.rank*.jsonl")))
    line = next(line for line in table if line.startswith("| residual_energy |"))
    cells = [c.strip() for c in line.strip("|").split("|")][1:]
    header = [c.strip() for c in table[0].strip("|").split("|")][1:]
    for group, keys in (("easy", easy), ("hard", hard)):
        if keys:
            kl = sum(mine[k]["fidelity.kl"] for k in keys) / len(keys)
            assert cells[header.index(f"fidelity.kl, {group}")].split(" ")[0] == f"{kl:.3g}"
    # pool on its own easy examples agrees with the full model every time, by construction
    pool_line = next(line for line in table if line.startswith("| pool |"))
    if easy:
        assert [c.strip() for c in pool_line.strip("|").split("|")][1:][header.index("fidelity.top1_agree, easy")] \
            .startswith("100")


def test_vtc_benchs_groups_leave_out_what_the_full_model_gets_wrong():
    full = {"a": {"accuracy.exact_match": 1.0}, "b": {"accuracy.exact_match": 1.0}, "c": {"accuracy.exact_match": 0.0},
            "d": {"accuracy.exact_match": 1.0}}
    base = {"a": {"accuracy.exact_match": 1.0}, "b": {"accuracy.exact_match": 0.0}, "c": {"accuracy.exact_match": 1.0},
            "d": {"accuracy.exact_match": 0.0}}
    key, easy, hard, left_out = split_on(base, full)
    assert (key, easy, hard, left_out) == ("accuracy.exact_match", {"a"}, {"b", "d"}, 1)  # B: a; A: b, d
    never = {k: {"accuracy.exact_match": 0.0} for k in full}  # a full model that gets nothing: split by agreement
    agree = {k: {**v, "fidelity.exact_match": float(k in "ab")} for k, v in base.items()}
    assert split_on(agree, never)[:3] == ("fidelity.exact_match", {"a", "b"}, {"c", "d"})
    with pytest.raises(InvalidInputError, match="not all 0 or 1"):
        split_on({"a": {"fidelity.kl": 0.3}}, {}, "fidelity.kl")
    with pytest.raises(InvalidInputError, match="no 0/1 metric"):
        split_on({"a": {"flops.ratio": 0.3}}, {})
    tasks = {"gqa:1": {"gqa.exact_match": 1.0}, "gqa:2": {"gqa.exact_match": 0.0}, "pope:1": {"pope.pope_accuracy": 0.0}}
    full_tasks = {"gqa:1": {"gqa.exact_match": 1.0}, "gqa:2": {"gqa.exact_match": 1.0},
                  "pope:1": {"pope.pope_accuracy": 1.0}}
    assert split_on(tasks, full_tasks)[1:] == ({"gqa:1"}, {"gqa:2", "pope:1"}, 0)  # each task's own correctness


def test_split_and_against_say_what_is_missing(run, tmp_path):
    with pytest.raises(InvalidInputError, match="no done row of this run is 'downsample'"):
        resprune.report.write_report(run, plots=False, split="downsample")
    with pytest.raises(InvalidInputError, match="--against dpp: no done row"):
        resprune.report.write_report(run, plots=False, against="dpp")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "results.jsonl").write_text((run / "results.jsonl").read_text())  # rows without their examples
    with pytest.raises(InvalidInputError, match="holds no per-example results"):
        resprune.report.write_report(bare, plots=False, against="random")
    assert examples_of(bare, load_results(bare)) == [{}] * len(load_results(bare))


class AnswerLength(Metric):
    """A relative metric a tiny random model scores above 0 (its answers have characters)."""

    name = "answer_length"
    relative = frozenset({"chars"})

    def compute(self, example):
        return {"chars": float(len(example.answer))}

    def baseline(self, record, reference, dims):
        return {"chars": float(len(reference.answer))}


def test_rel_carries_its_paired_interval(tmp_path, plugin_host):
    import resprune.backbones.llava as llava
    import resprune.strategies.metrics as metrics
    import resprune.strategies.random_choice as random_choice
    import resprune.strategies.residual_energy as residual_energy
    import resprune.strategies.text_relevance as text_relevance

    class Plugin:
        @staticmethod
        @resprune.hookimpl
        def resprune_register_metrics(register):
            register(AnswerLength)

    plugin_host(residual_energy, random_choice, text_relevance, llava, metrics, Plugin)
    table = study({"selector": ["residual_energy", "random"], "budget": [16]}, limit=5,
                  metrics=["answer_length"]).run(tmp_path)
    full = lines_of(tmp_path / FULL_EXAMPLES)
    for row in table[1:]:
        mine = lines_of(next((tmp_path / "cells" / row["cell"]).glob("examples.rank*.jsonl")))
        keys = list(mine)  # the run's order: the bootstrap resamples the examples in it
        want = ratio_interval([[mine[k]["answer_length.chars"]] for k in keys],
                              [[full[k]["answer_length.chars"]] for k in keys], seed=0)
        assert row["rel"] == pytest.approx(want.estimate)
        assert row["rel_interval"] == pytest.approx([want.low, want.high])
    assert cli(["report", str(tmp_path), "--no-plots", "--csv", str(tmp_path / "t.csv")]) == 0
    row = table[1]
    low, high = (f"{100 * v:.1f}" for v in row["rel_interval"])
    assert re.search(rf"\| {100 * row['rel']:.1f} \({re.escape(low)}–{re.escape(high)}\) \|", (tmp_path / "report.md").read_text())
    header = (tmp_path / "t.csv").read_text().splitlines()[0].split(",")
    assert "rel.ci_low" in header and "rel.ci_high" in header
