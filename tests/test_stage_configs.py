"""The shipped configs of the paper's baselines run on every backbone, in `resprune run` and in sweeps."""

from __future__ import annotations

import json

import pytest

import resprune
from resprune.cli import main as cli
from resprune.data import PHOTOS, photo_path

BACKBONES = ("llava", "llava_next", "qwen2_5_vl")
METHODS = ("fastv", "pdrop", "dart", "visionzip", "prumerge")


def config_for(method: str, model_type: str) -> str:
    if model_type == "qwen2_5_vl" and method == "sparsevlm":
        return "sparsevlm-qwen2.5-vl"  # M-RoPE positions are kept, the official counts become shares
    if model_type == "qwen2_5_vl" and method in ("visionzip", "prumerge"):
        return "visionzip-qwen2.5-vl"  # no CLS attention in Qwen2.5-VL's tower
    if model_type == "qwen2_5_vl" and method == "pdrop":
        return "pdrop-qwen2.5-vl"  # M-RoPE positions are kept, not re-indexed
    return method


@pytest.mark.parametrize("model_type", BACKBONES)
@pytest.mark.parametrize("method", [*METHODS, "sparsevlm"])
def test_shipped_method_runs_from_the_command_line(method, model_type, tmp_path, capsys):
    out = tmp_path / "overlay.png"
    budget = 64 if method == "sparsevlm" else 8  # SparseVLM's official counts exist for 192, 128 and 64
    code = cli(["run", config_for(method, model_type), f"budget={budget}", "--model", f"tiny:{model_type}:25",
                "--image", str(photo_path(PHOTOS[1])), "--prompt", "What animal is this?", "--max-new-tokens", "2",
                "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    pipe = resprune.load_pipeline(config_for(method, model_type), budget=budget)
    for stage in pipe.stages:
        assert f"{stage.where} stage, image 0: kept" in text
    if pipe.llm_stages:
        assert f"(layer {pipe.llm_stages[-1].layer}+)" in text  # the token schedule is printed
    assert out.is_file()


CLIP_METHODS = ("vispruner", "scope", "hired", "cdpruner", "trim")
"""Methods that read the CLIP tower's CLS attention and features (LLaVA-1.5 and LLaVA-NeXT)."""


@pytest.mark.parametrize("config", [*[(m, t) for m in CLIP_METHODS for t in ("llava", "llava_next")],
                                    ("vispruner-llava-next", "llava_next"), ("hired-llava-next", "llava_next"),
                                    ("cdpruner-llava-next", "llava_next"), ("prumerge-adaptive", "llava"),
                                    ("trim-adaptive", "llava"), ("prumerge-adaptive", "llava_next")])
def test_clip_tower_method_runs_from_the_command_line(config, tmp_path, capsys):
    method, model_type = config
    code = cli(["run", method, "budget=8", "--model", f"tiny:{model_type}", "--image", str(photo_path(PHOTOS[1])),
                "--prompt", "What animal is this?", "--max-new-tokens", "2", "--out", str(tmp_path / "o.png")])
    assert code == 0
    text = capsys.readouterr().out
    if method.endswith("-adaptive"):  # each image keeps its outliers (at least one), plus the merged token
        assert "input stage, image 0: kept" in text
        return
    kept = 9 if method == "trim" else 8  # TRIM's mean token comes on top of its budget
    assert f"input stage, image 0: kept {kept}" in text


@pytest.mark.parametrize("model_type", ["llava", "llava_next"])
def test_tome_runs_inside_the_tower_from_the_command_line(model_type, tmp_path, capsys):
    code = cli(["run", "tome", "budget=64", "--model", f"tiny:{model_type}", "--image", str(photo_path(PHOTOS[1])),
                "--prompt", "What animal is this?", "--max-new-tokens", "2", "--out", str(tmp_path / "o.png")])
    assert code == 0
    text = capsys.readouterr().out
    assert "vision layer 0 stage, image 0: kept" in text
    assert "vision tower tokens" in text and "(vision layer 23+)" in text  # the tower's schedule is printed
    if model_type == "llava":
        assert "kept 64 of the 576 visual tokens" in text


def test_tome_on_qwen_is_refused_with_the_layers_it_allows(capsys):
    code = cli(["run", "tome", "budget=64", "--model", "tiny:qwen2_5_vl", "--image", str(photo_path(PHOTOS[1])),
                "--prompt", "What?", "--max-new-tokens", "1"])
    assert code != 0
    assert "allowed vision layers: none" in capsys.readouterr().err


@pytest.mark.parametrize("method", CLIP_METHODS)
def test_clip_tower_method_on_qwen_is_refused_by_name(method, capsys):
    code = cli(["run", method, "budget=8", "--model", "tiny:qwen2_5_vl", "--image", str(photo_path(PHOTOS[1])),
                "--prompt", "What?", "--max-new-tokens", "1"])
    assert code != 0
    err = capsys.readouterr().err
    field = "clip_checkpoint" if method in ("cdpruner", "trim") else "cls_attention"
    assert field in err and "qwen2_5_vl" in err


def test_table_i_sweep_lays_out_methods_before_and_inside_the_llm(tmp_path):
    out = tmp_path / "table-i"
    code = cli(["sweep", "table-i", "--quiet", "limit=1", "max_new_tokens=2", "model=tiny:llava:25",
                "grid.budget=[64]",
                "grid.base=[resprune-llava15,visionzip,fastv,pdrop,dart,vispruner,scope,hired,tome,sparsevlm,cdpruner,"
                "trim,prumerge,pool]",
                "--out", str(out)])
    assert code == 0
    rows = {r["method"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {"full", "resprune-llava15", "visionzip", "fastv", "pdrop", "dart", "vispruner", "scope",
                         "hired", "tome", "sparsevlm", "cdpruner", "trim", "prumerge", "pool"}
    assert all(r["status"] == "done" and r["examples"] == 1 for r in rows.values())
    ratio = {m: r["metrics"]["flops.ratio"] for m, r in rows.items() if m != "full"}
    # the same 64 tokens kept, but FastV and DART run layers 0-1 on every token and PDrop keeps
    # 64 at layer 8, then 32 and 16: each costs more than pruning before the LLM
    assert ratio["resprune-llava15"] == pytest.approx(ratio["visionzip"]) == pytest.approx(ratio["scope"]) \
        == pytest.approx(ratio["cdpruner"]) == pytest.approx(ratio["pool"])
    assert ratio["cdpruner"] < ratio["trim"]  # TRIM's mean token comes on top
    assert ratio["fastv"] == pytest.approx(ratio["dart"])
    assert ratio["resprune-llava15"] < ratio["fastv"] < ratio["pdrop"] < 1
    assert ratio["tome"] == pytest.approx(ratio["resprune-llava15"])  # 64 tokens reach the LLM
    tower = {m: r["metrics"]["vision_flops.ratio"] for m, r in rows.items() if m != "full"}
    assert tower["tome"] < 0.6 and tower["resprune-llava15"] == 1.0  # only ToMe shortens the tower
    assert cli(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert all(f"| {m} |" in report for m in ("fastv", "pdrop", "dart", "visionzip", "vispruner", "scope", "hired",
                                              "tome", "sparsevlm", "cdpruner", "trim", "prumerge"))
    # SparseVLM's 64 row keeps 66, 30 and 17 (plus recycled tokens) after layers 2, 6 and 15: its
    # average token count is about 64, so its FLOPs sit between pruning before the LLM and PDrop's
    assert ratio["resprune-llava15"] < ratio["sparsevlm"] < ratio["pdrop"]


def test_config_command_prints_the_stages(capsys):
    assert cli(["config", "pdrop", "budget=64", "stages.2.budget=0.25"]) == 0
    text = capsys.readouterr().out
    assert "stages:" in text and "layer: 24" in text and "budget: 0.25" in text
    assert cli(["configs"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("fastv", "pdrop", "dart", "visionzip", "prumerge"))


def test_table_ii_sweep_lays_out_the_llava_next_rows(tmp_path):
    out = tmp_path / "table-ii"
    code = cli(["sweep", "table-ii", "--quiet", "limit=1", "max_new_tokens=2", "model=tiny:llava_next:25",
                "grid.budget=[320]", "--out", str(out)])
    assert code == 0
    rows = {r["method"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {"full", "resprune-llava-next", "random", "pool", "fastv", "prumerge", "pdrop",
                         "sparsevlm-llava-next", "divprune", "visionzip", "dart"}
    assert all(r["status"] == "done" and r["examples"] == 1 for r in rows.values())
    assert cli(["report", str(out)]) == 0


TODAYS = {"gemma3": ("resprune-gemma3", 2), "qwen3_vl": ("resprune-qwen3-vl", 2), "qwen3_5": ("resprune-qwen3.5", 4),
          "internvl": ("resprune-internvl", 2)}
"""The backbones of issue 23: their ResPrune config, and a layer FastV acts at on their tiny model of
8 layers (Qwen3.5: it reads layer K-1, which must be a full-attention layer: 3)."""


@pytest.mark.parametrize("model_type", sorted(TODAYS))
@pytest.mark.parametrize("method", ["resprune", "divprune", "dpp", "visionzip-qwen2.5-vl", "fastv"])
def test_todays_backbones_run_selectors_a_merger_and_an_llm_stage_from_the_command_line(method, model_type, capsys):
    config, layer = TODAYS[model_type]
    args = [config if method == "resprune" else method, "budget=32"]  # InternVL: at least one per tile (up to 13)
    args += [f"stages.0.layer={layer}"] if method == "fastv" else []
    code = cli(["run", *args, "--model", f"tiny:{model_type}:8", "--image", str(photo_path(PHOTOS[1])), "--prompt",
                "What animal is this?", "--max-new-tokens", "2", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    [kept] = report["kept"]
    assert kept["stage"] == (f"layer {layer}" if method == "fastv" else "input")
    assert kept["kept"] == 32 < kept["entering"] and (kept["merged"] > 0) == (method == "visionzip-qwen2.5-vl")
    assert report["prefill_flops"]["pruned"] < report["prefill_flops"]["full"]
