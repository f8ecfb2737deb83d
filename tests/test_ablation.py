"""Ablation studies: grid validation, runs, resumption, failures, metrics, data, sweeps."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import resprune
from resprune.ablation import AblationError, expand_grid
from resprune.data import load_records
from resprune.metrics import Example, Reference, normalize_answer, vqa_score
from resprune.costs import LLMDims
from resprune.interfaces import Selector
from resprune.models import load_model
from resprune.sweep import load_sweep
from resprune.testing.reference import optimal_rank_k_residual, total_residual

METRICS = ["accuracy", "fidelity", "reconstruction", "relevance_mass", "flops", "kv_cache", "latency"]


@functools.cache
def tiny(model_type: str = "llava"):
    return load_model(f"tiny:{model_type}")


def study(grid, *, limit=2, metrics=METRICS, base="resprune-llava15", model_type="llava", **kw):
    model, processor = tiny(model_type)
    return resprune.Ablation(base, grid, model=model, processor=processor, metrics=metrics, limit=limit,
                             model_name=f"tiny:{model_type}", max_new_tokens=3, progress=False, **kw)


class LLMCalls:
    """Counts forward calls of the language model (to prove work was or was not done)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.model.language_model.register_forward_hook(self)

    def __call__(self, *args):
        self.n += 1

    def close(self):
        self.handle.remove()


# --- the grid ---------------------------------------------------------------------------------


def test_grid_expands_and_skips_params_a_selector_does_not_have():
    cells = expand_grid("resprune-llava15", {"selector": ["residual_energy", "divprune"], "budget": [16, 32],
                                             "selector.params.alpha": [0.25, 0.75]})
    assert len(cells) == 8
    run = [c for c in cells if not c.skip]
    skipped = [c for c in cells if c.skip]
    assert sorted(c.label for c in run) == [
        "divprune budget=16", "divprune budget=32",
        "residual_energy alpha=0.25 budget=16", "residual_energy alpha=0.25 budget=32",
        "residual_energy alpha=0.75 budget=16", "residual_energy alpha=0.75 budget=32"]
    assert len(skipped) == 2
    assert all("selector 'divprune' has no parameter 'alpha'" in c.skip for c in skipped)
    re_cell = next(c for c in run if c.label == "residual_energy alpha=0.25 budget=16")
    assert re_cell.config.selector.params.alpha == 0.25 and re_cell.config.budget == 16
    assert re_cell.config.selector.params.seed == "cls_attention"  # base params kept for the base selector
    dp = next(c for c in run if c.label == "divprune budget=16")
    assert dict(dp.config.selector.params) == {}


@pytest.mark.parametrize("grid, message", [
    ({"selector": ["residual_energy"], "selector.params.alpah": [0.5]}, r"alpah.*Did you mean 'alpha'"),
    ({"selector": ["resprune_x"]}, r"selector.*resprune_x"),
    ({"budget": [64, 0]}, r"cell 'residual_energy budget=0'.*budget"),
    ({"selector.params.alpha": [-1.0]}, r"cell .*alpha"),
    ({"budgett": [64]}, r"budgett.*budget"),
    ({}, "non-empty"),
])
def test_invalid_grids_fail_before_any_model_work(grid, message):
    model, _ = tiny()
    calls = LLMCalls(model)
    try:
        with pytest.raises(AblationError, match=message):
            study(grid)
    finally:
        calls.close()
    assert calls.n == 0


def test_unknown_metric_and_incompatible_pipeline_name_the_problem():
    with pytest.raises(AblationError, match=r"metrics.*acuracy.*accuracy"):
        study({"budget": [16]}, metrics=["acuracy"])
    # CLS-attention seeding on Qwen2.5-VL (no CLS token): named cell, before model work
    with pytest.raises(AblationError, match=r"cell 'residual_energy budget=16'.*cls_attention"):
        study({"budget": [16]}, model_type="qwen2_5_vl")


# --- running ----------------------------------------------------------------------------------


def test_run_results_full_row_and_keep_all_fidelity(tmp_path):
    s = study({"selector": ["residual_energy", "random"], "budget": [16, 1.0]})
    table = s.run(tmp_path)
    assert [r["label"] for r in table] == ["full (unpruned)", "residual_energy budget=16", "residual_energy budget=1.0",
                                           "random budget=16", "random budget=1.0"]
    assert all(r["status"] == "done" and r["examples"] == 2 for r in table)
    full = table[0]
    assert {"accuracy.exact_match", "flops.prefill_tflops", "kv_cache.mib", "latency.prefill_ms"} <= set(full["metrics"])
    for row in table[1:]:
        m = row["metrics"]
        assert {"fidelity.kl", "fidelity.top1_agree", "reconstruction.residual", "flops.ratio",
                "latency.selection_ms", "relevance_mass.share"} <= set(m)
        if row["budget"] == 1.0:  # keeping every token is the unpruned model, exactly
            assert m["fidelity.kl"] == 0.0 and m["fidelity.top1_agree"] == 1.0 and m["fidelity.exact_match"] == 1.0
            assert m["flops.ratio"] == 1.0 and m["reconstruction.residual"] == pytest.approx(0.0, abs=1e-9)
            assert m["relevance_mass.share"] == pytest.approx(1.0)
        else:
            assert m["flops.ratio"] < 0.2 and m["relevance_mass.share"] < 1.0
    on_disk = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert on_disk == json.loads(json.dumps(list(table)))
    cell = tmp_path / "cells" / table[1]["cell"]
    meta = json.loads((cell / "meta.rank0.json").read_text())
    assert meta["seed"] == 0 and meta["device"] == "cpu" and "resprune.strategies.residual_energy" in meta["plugins"]
    assert "budget: 16" in (cell / "config.yaml").read_text()
    assert table.to_markdown().count("budget") >= 1


def test_rerun_skips_finished_cells_and_resumes_examples(tmp_path):
    s = study({"selector": ["residual_energy", "random"], "budget": [16]})
    first = s.run(tmp_path)
    calls = LLMCalls(s.model)
    try:
        again = s.run(tmp_path)
        assert calls.n == 0  # nothing recomputed: references and cells are reused
        # an interrupted cell: drop its summary and its last example, and rerun
        cell = tmp_path / "cells" / first[1]["cell"]
        (cell / "summary.json").unlink()
        lines = (cell / "examples.rank0.jsonl").read_text().splitlines()
        (cell / "examples.rank0.jsonl").write_text(lines[0] + "\n")
        third = s.run(tmp_path)
        assert 0 < calls.n <= 8  # one example of one cell (generate + timed prefills)
    finally:
        calls.close()
    strip = lambda t: [{k: v for k, v in r["metrics"].items() if not k.startswith("latency")} for r in t]  # noqa: E731
    assert strip(first) == strip(again) == strip(third)


def test_unpruned_outputs_are_computed_once_per_example(tmp_path):
    s = study({"selector": ["residual_energy", "random", "uniform"], "budget": [16]}, metrics=["fidelity"])
    calls = LLMCalls(s.model)
    try:
        s.run(tmp_path)
    finally:
        calls.close()
    assert len(list((tmp_path / "reference").glob("*.safetensors"))) == 2
    # generate(max_new_tokens=3) = 3 LLM calls per example: 2 examples x (1 reference + 3 cells)
    assert calls.n == 2 * 4 * 3


class Exploding(Selector):
    name = "exploding"

    def select(self, tokens, k, scores, context):
        raise RuntimeError("boom")


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path, plugin_host):
    import resprune.backbones.llava as llava
    import resprune.strategies.metrics as metrics
    import resprune.strategies.cls_attention as cls_attention
    import resprune.strategies.residual_energy as residual_energy
    import resprune.strategies.text_relevance as text_relevance

    class Plugin:
        @staticmethod
        @resprune.hookimpl
        def resprune_register_selectors(register):
            register(Exploding)

    plugin_host(residual_energy, cls_attention, text_relevance, llava, metrics, Plugin)
    s = study({"selector": ["exploding", "residual_energy"], "budget": [16]}, metrics=["fidelity"])
    table = s.run(tmp_path)
    status = {r["label"]: (r["status"], r["reason"]) for r in table}
    assert status["exploding budget=16"][0] == "failed" and "RuntimeError: boom" in status["exploding budget=16"][1]
    assert status["residual_energy budget=16"] == ("done", None)


# --- metrics ----------------------------------------------------------------------------------


def test_answer_normalisation_and_vqa_score():
    assert normalize_answer("  The Cat!  ") == "cat"
    assert normalize_answer("Two dogs.") == "2 dogs"
    assert vqa_score("cat", ["cat"]) == 1.0
    assert vqa_score("cat", ["dog"]) == 0.0
    # 10 answers, 2 say "cat": each leave-one-out subset has 1 or 2 matches -> (8 * 2/3 + 2 * 1/3) / 10
    assert vqa_score("cat", ["cat", "cat"] + ["dog"] * 8) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert vqa_score("cat", ["cat"] * 4 + ["dog"] * 6) == pytest.approx(1.0)


def test_reconstruction_and_fidelity_match_their_definitions():
    from resprune.injection import ImageSelection

    v = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    kept = torch.tensor([1, 4, 9])
    sel = ImageSelection(row=0, image=0, kept=kept, order=kept, k=3, n=30)
    logits = torch.randn(50)
    ex = Example(record={"answers": ["x"]}, answer="x", first_logits=logits, selections=[sel], tokens_before=100,
                 tokens_after=40, dims=LLMDims(64, 128, 2, 2, 16), features=[v],
                 reference=Reference("x", logits.clone(), 100))
    host = resprune.get_host().metrics
    rec = host.get("reconstruction")({}).compute(ex)
    total = float(v.double().pow(2).sum())
    assert rec["residual"] == pytest.approx(total_residual(v, kept) / total)
    assert rec["vs_svd"] == pytest.approx(total_residual(v, kept) / optimal_rank_k_residual(v, 3))
    fid = host.get("fidelity")({}).compute(ex)
    assert fid == {"kl": 0.0, "top1_agree": 1.0, "exact_match": 1.0}
    ex.first_logits = logits + torch.linspace(0, 3, 50)
    p, q = torch.log_softmax(logits, -1), torch.log_softmax(ex.first_logits, -1)
    assert host.get("fidelity")({}).compute(ex)["kl"] == pytest.approx(float((p.exp() * (p - q)).sum()), rel=1e-5)
    assert host.get("accuracy")({}).compute(ex) == {"exact_match": 1.0, "vqa_score": 1.0}


def test_metrics_are_plugins_listed_by_the_cli(capsys):
    from resprune.cli import main

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name in ("fidelity", "accuracy", "reconstruction", "relevance_mass", "flops", "vision_flops", "kv_cache",
                 "latency", "memory"):
        assert f"metric    {name}" in out


# --- data ---------------------------------------------------------------------------------------


def test_jsonl_and_csv_datasets_with_relative_image_paths(tmp_path):
    photo = Path(load_records()[0]["image"])
    shutil.copy(photo, tmp_path / "a.jpg")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.jpg", "question": "q?", "answers": ["x"]}) + "\n")
    (tmp_path / "d.csv").write_text('image,question,answers\na.jpg,q?,x|y\n')
    for name in ("d.jsonl", "d.csv"):
        (rec,) = load_records(tmp_path / name)
        assert rec["image"] == str(tmp_path / "a.jpg") and rec["question"] == "q?"
    assert load_records(tmp_path / "d.csv")[0]["answers"] == ["x", "y"]
    (tmp_path / "bad.jsonl").write_text('{"image": "a.jpg"}\n')
    with pytest.raises(resprune.InvalidInputError, match="record 0 has no 'question'"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"image": "a.jpg", "question": "q"}\n{oops\n')
    with pytest.raises(resprune.InvalidInputError, match=r"broken.jsonl:2"):
        load_records(tmp_path / "broken.jsonl")


def test_huggingface_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = load_records()
    ds = datasets.Dataset.from_list([{"image": r["image"], "question": r["question"]} for r in records[:3]])
    ds.save_to_disk(str(tmp_path / "ds"))
    assert [r["question"] for r in load_records(tmp_path / "ds")] == [r["question"] for r in records[:3]]


# --- sweeps ---------------------------------------------------------------------------------------


def test_default_sweep_and_overrides():
    spec = load_sweep()
    assert spec.model == "tiny:llava" and len(spec.grid["selector"]) >= 4 and len(spec.grid["budget"]) >= 3
    spec = load_sweep(None, ["grid.budget=[8]", "model=tiny:qwen2_5_vl"])
    assert spec.grid["budget"] == [8] and spec.model == "tiny:qwen2_5_vl"
    with pytest.raises(AblationError, match="Did you mean 'grid'"):
        load_sweep(None, ["gird.budget=[8]"])


def test_sweep_and_report_commands(tmp_path, capsys):
    from resprune.cli import main

    out = tmp_path / "run"
    assert main(["sweep", "--out", str(out), "--quiet", "limit=2", "max_new_tokens=2"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sum(r["status"] == "done" for r in rows) == 1 + 5 * 3  # full + 5 selectors x 3 budgets
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert all(name in report for name in ("residual_energy", "divprune", "dpp", "random", "pool"))
    assert list((out / "plots").glob("*.png")) and list((out / "plots").glob("*.svg"))


@pytest.mark.slow
def test_two_processes_give_the_same_table_as_one(tmp_path):
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate is not installed")
    args = ["sweep", "--quiet", "limit=3", "max_new_tokens=2", "grid.budget=[16]",
            "grid.selector=[residual_energy,random]"]
    subprocess.run([sys.executable, "-m", "resprune.cli", *args, "--out", str(tmp_path / "one")], check=True,
                   capture_output=True)
    subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "-m", "resprune.cli", *args,
                    "--out", str(tmp_path / "two")], check=True, capture_output=True)
    assert list((tmp_path / "two" / "cells").glob("*/examples.rank1.jsonl"))  # really two processes
    one, two = ([json.loads(line) for line in (tmp_path / d / "results.jsonl").read_text().splitlines()]
                for d in ("one", "two"))
    strip = lambda t: [(r["label"], r["examples"], {k: round(v, 6) for k, v in r["metrics"].items()  # noqa: E731
                        if not k.startswith("latency")}) for r in t]
    assert strip(one) == strip(two)


def test_rows_carry_95_percent_intervals_into_the_report_csv_and_frame(tmp_path):
    """Each row's metrics get the 95 % interval of their mean over the examples: Wilson's for a 0/1
    metric (equal to scipy's on the examples the cell wrote), a seeded bootstrap otherwise; the
    report shows them in brackets and the CSV as ``<metric>.ci_low`` / ``.ci_high``."""
    from scipy import stats

    from resprune.cli import main as cli

    s = study({"selector": ["residual_energy", "random"], "budget": [16]}, limit=3)
    table = s.run(tmp_path)
    for row in table:
        assert row["intervals"] and set(row["intervals"]) <= set(row["metrics"])
        for key, (low, high) in row["intervals"].items():
            assert low <= row["metrics"][key] <= high, (row["label"], key)
    row = table[1]
    lines = [json.loads(x) for x in (tmp_path / "cells" / row["cell"] / "examples.rank0.jsonl").read_text().splitlines()]
    agree = [line["metrics"]["fidelity.top1_agree"] for line in lines]
    wilson = stats.binomtest(int(sum(agree)), len(agree)).proportion_ci(0.95, method="wilson")
    assert row["intervals"]["fidelity.top1_agree"] == pytest.approx([wilson.low, wilson.high])
    assert s.run(tmp_path)[1]["intervals"] == row["intervals"]  # seeded: a rerun gives the same intervals
    out = tmp_path / "table.csv"
    assert cli(["report", str(tmp_path), "--no-plots", "--csv", str(out)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "95 % intervals over the examples in brackets" in text
    low, high = (f"{v:.3g}" for v in row["intervals"]["fidelity.kl"])
    assert f"({low}–{high})" in text
    import csv

    with out.open() as f:
        records = list(csv.DictReader(f))
    mine = next(r for r in records if r["cell"] == row["cell"])
    assert float(mine["fidelity.kl.ci_low"]) == pytest.approx(row["intervals"]["fidelity.kl"][0])


def test_each_method_is_tested_against_resprune_at_its_budget(tmp_path):
    """Paired tests on the examples the cells wrote: Wilcoxon's for a continuous metric, McNemar's
    (scipy's binomial test on the discordant pairs) for a 0/1 one, Holm-corrected across the table;
    the reference row and the full row carry none; `against=None` runs none."""
    from scipy import stats

    s = study({"selector": ["residual_energy", "random", "topk"], "budget": [16]}, limit=4,
              base="topk-relevance", metrics=["fidelity", "flops"])
    table = s.run(tmp_path)
    by = {r["selector"] if r["method"] != "full" else "full": r for r in table}
    assert "tests" not in by["full"] and "tests" not in by["residual_energy"]

    def examples(row):
        path = tmp_path / "cells" / row["cell"] / "examples.rank0.jsonl"
        return [json.loads(x)["metrics"] for x in path.read_text().splitlines()]

    ref = examples(by["residual_energy"])
    raw = {}
    for name in ("random", "topk"):
        mine = examples(by[name])
        kl = [m["fidelity.kl"] for m in mine], [m["fidelity.kl"] for m in ref]
        raw[name] = 1.0 if kl[0] == kl[1] else stats.wilcoxon(*kl).pvalue
        assert by[name]["tests"]["against"] == "residual_energy"
        agree = [m["fidelity.top1_agree"] for m in mine], [m["fidelity.top1_agree"] for m in ref]
        only = sum(a > b for a, b in zip(*agree)), sum(a < b for a, b in zip(*agree))
        mcnemar = stats.binomtest(only[0], sum(only), 0.5).pvalue if sum(only) else 1.0
        assert by[name]["tests"]["p"]["fidelity.top1_agree"] >= mcnemar - 1e-12  # Holm only raises p-values
    low, high = sorted(raw, key=raw.get)
    expected = {low: min(1.0, 2 * raw[low]), high: max(min(1.0, 2 * raw[low]), raw[high])}  # Holm over 2 methods
    assert {n: by[n]["tests"]["p"]["fidelity.kl"] for n in raw} == pytest.approx(expected)
    frame_columns = resprune.ResultTable(table).to_pandas().columns
    assert "fidelity.kl.p_vs_residual_energy" in frame_columns
    none = study({"selector": ["residual_energy", "random"], "budget": [16]}, limit=4, base="topk-relevance",
                 metrics=["fidelity"], against=None).run(tmp_path / "none")
    assert not any("tests" in r for r in none)
