"""The benchmark scripts: their naive reference is right, and they run (tiny sizes)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from resprune.testing.reference import greedy_residual_reference

from helpers import make_tokens

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_e2e
        import bench_selection

        yield bench_selection, bench_e2e
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("seed", range(5))
def test_naive_baseline_is_greedy_residual_selection(bench, seed):
    bench_selection, _ = bench
    tokens = make_tokens(40, 16, seed=seed)
    assert bench_selection.naive_residual_select(tokens, 12).tolist() == greedy_residual_reference(tokens, 12)


def test_selection_benchmark_smoke_table(bench, capsys):
    bench_selection, _ = bench
    assert bench_selection.main(["--smoke", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for name in ("residual_energy", "dpp", "divprune", "text_relevance"):
        assert name in out


def test_e2e_benchmark_pruned_runs_see_fewer_tokens(bench, capsys):
    _, bench_e2e = bench
    assert bench_e2e.main(["--smoke", "--backbones", "llava"]) == 0
    rows = [[c.strip() for c in line.split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| llava")]
    tokens = {(r[2], r[5]): int(r[7]) for r in rows}  # (method, run) -> prompt tokens at the last layer
    full = tokens[("-", "full")]
    for method in bench_e2e.METHODS:  # before the LLM and inside it, each beside its oracle
        assert tokens[(method, "pruned")] < full, method
        if method not in bench_e2e.NO_ORACLE:
            assert tokens[(method, "pruned")] == tokens[(method, "oracle")], method
        else:  # inside the vision tower the selection is part of the tower's run
            assert (method, "oracle") not in tokens


@pytest.mark.parametrize("model_type, billions", [("llava", 7.06), ("llava_next", 7.06), ("qwen2_5_vl", 8.29)])
def test_full_size_configs_have_the_real_parameter_counts(bench, model_type, billions):
    _, bench_e2e = bench
    from resprune.testing.tiny import tiny_lvlm

    model, _ = tiny_lvlm(model_type, image_size=bench_e2e.IMAGE_SIZE[model_type])
    cfg = bench_e2e.full_size_config(model.config, model_type)
    with torch.device("meta"):
        big = type(model)(cfg)
    assert sum(p.numel() for p in big.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)


def test_gpu_check_runs_and_reports_every_target(tmp_path, capsys):
    """The GPU check's own logic, at tiny sizes on CPU (CI has no GPU; the real run is
    `bash benchmarks/gpu-check.sh` on one)."""
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCH))
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "gpu-check.md").read_text()
    assert "| case | residual_energy (auto) | triton persistent | triton step | naive torch loop | one Gram GEMM |" \
        in report
    assert "| backbone | method | B | budget | run |" in report
    assert "| L | sdpa ms | last-row ms | last / sdpa |" in report  # the cost of scoring inside the LLM
    assert "`resprune-video` (budget 0.25) selection against the pruned prefill" in report  # videos
    assert all(f"| {a} |" in report for a in ("global", "uniform", "energy"))
    for backbone in ("llava", "llava_next", "qwen2_5_vl"):
        for method in ("resprune", "fastv"):  # before the LLM and inside it
            assert f"pruned / oracle prefill <= 1.05, {backbone} {method}, B=1" in report
    for backbone in ("llava", "llava_next"):  # ToMe runs in CLIP towers
        # inside the vision tower: no oracle, but never slower than the full model (the first H200 run
        # lost its whole end-to-end table to a KeyError here)
        assert f"pruned never slower than full, {backbone} tome, B=1" in report
        assert f"pruned / oracle prefill <= 1.05, {backbone} tome" not in report
    assert "picks equal the CPU float32 reference up to ties" in report and "DIFFERENT" not in report
    passed, total = (int(x) for x in re.search(r"Targets: (\d+) of (\d+) pass", report).groups())
    assert report.count("| PASS |") == passed and report.count("| PASS |") + report.count("| FAIL |") == total


def test_llm_scoring_benchmark_runs(bench, capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_llm_stages
    finally:
        sys.path.remove(str(BENCH))
    assert bench_llm_stages.main(["--smoke"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 256 |")]
    assert len(rows) == 1 and rows[0].count("%") == 2


def test_video_benchmark_keeps_its_budget_of_every_frame_count(bench, capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_video
    finally:
        sys.path.remove(str(BENCH))
    assert bench_video.main(["--smoke", "--frames", "4", "8", "--repeats", "1"]) == 0
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if re.match(r"\| \d", line)]
    assert [(int(r[0]), r[1], int(r[2]), int(r[3])) for r in rows] == [  # N = 8 F, k = N / 4
        (4, "global", 32, 8), (4, "uniform", 32, 8), (4, "energy", 32, 8),
        (8, "global", 64, 16), (8, "uniform", 64, 16), (8, "energy", 64, 16)]
