"""What a new user tripped over: every message points at the fix, and what `run` prints is what
happened (tokens entering each stage, merged tokens, a JSON form)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import resprune
from resprune.cli import build_parser, main
from resprune.config import load_config
from resprune.data import photo_path
from resprune.errors import ConfigError, MissingContextError, InvalidInputError
from resprune.metrics import same_answer, vqa_score
from resprune.models import load_model
from resprune.stages import Stage

PHOTO = str(photo_path("coffee"))
DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_a_stage_deeper_than_a_tiny_model_points_at_a_deeper_tiny_model():
    model, processor = load_model("tiny:llava")
    with pytest.raises(InvalidInputError, match=r"tiny:llava is a tiny random model with 2 decoder layers; give it "
                                                r"more with tiny:llava:<layers> \(e\.g\. tiny:llava:32\)"):
        resprune.load_pipeline("pdrop").attach(model, processor)
    help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    assert "2 LLM decoder layers" in " ".join(help_text.split()) and "tiny:llava:32" in help_text


def test_run_counts_the_tokens_entering_each_stage(capsys):
    assert main(["run", "pdrop", "--model", "tiny:llava:32", "--image", PHOTO, "--prompt", "What is it?",
                 "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "layer 8 stage, image 0: kept 288 of the 576 visual tokens\n" in out
    assert "layer 16 stage, image 0: kept 144 of the 288 visual tokens entering it (576 in the image)" in out
    assert "layer 24 stage, image 0: kept 72 of the 144 visual tokens entering it (576 in the image)" in out


def test_run_says_how_many_kept_tokens_a_merger_made_and_json_holds_it_all(capsys):
    args = ["run", "visionzip", "--model", "tiny:llava", "--image", PHOTO, "--prompt", "What is it?",
            "--max-new-tokens", "1", "budget=64"]
    assert main(args) == 0
    merged = re.search(r"kept 64 of the 576 visual tokens; (\d+) of them merged from dropped tokens",
                       capsys.readouterr().out)
    assert merged and 0 < int(merged.group(1)) < 64
    assert main(args + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)  # nothing but the JSON on stdout
    (stage,) = summary["kept"]
    assert stage["stage"] == "input" and stage["entering"] == stage["image_tokens"] == 576
    assert stage["kept"] == len(stage["indices"]) == 64 and stage["merged"] == int(merged.group(1))
    assert summary["prompt_tokens"] > summary["token_schedule"][-1][1]
    assert summary["prefill_flops"]["pruned"] < summary["prefill_flops"]["full"]


def test_a_config_for_another_backbone_points_at_the_shipped_variant():
    model, processor = load_model("tiny:qwen2_5_vl")
    with pytest.raises(MissingContextError, match="resprune ships 'visionzip-qwen2.5-vl': run that config instead"):
        resprune.load_pipeline("visionzip").attach(model, processor)


def test_help_lists_every_kind_of_plugin_and_the_plugin_guide_counts_its_hooks():
    help_text = " ".join(build_parser().format_help().split())
    assert "scorer, selector, merger, injector and metric" in help_text
    from resprune import hookspecs

    hooks = [n for n in dir(hookspecs) if n.startswith("resprune_register_")]
    words = {4: "four", 5: "five", 6: "six", 7: "seven"}
    assert f"the {words[len(hooks)]} hooks" in (DOCS / "plugins.md").read_text()


@pytest.mark.parametrize(("a", "b", "same"), [("The cat.", "cat", True), ("Two", "2", True), ("??", "!!", False),
                                              ("", "", False), ("the", "a", False), ("cat", "dog", False)])
def test_answers_that_normalise_to_nothing_never_match(a, b, same):
    assert same_answer(a, b) is same
    assert vqa_score(a, [b]) == float(same)


def test_every_shipped_sweep_is_listed_and_an_unknown_one_names_them(capsys):
    assert main(["sweeps"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    shipped = sorted(p.stem for p in (Path(resprune.__file__).parent / "configs" / "sweeps").glob("*.yaml"))
    assert listed == shipped
    assert main(["sweep", "table-v"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'table-iv'?" in err and all(name in err for name in shipped)


def test_a_layer_given_as_text_says_so():
    with pytest.raises(ConfigError, match=r"stage layer='2': a layer number must be an int, got a str \(layer=2\)"):
        Stage("topk", budget=4, layer="2")


def test_text_relevance_inside_the_llm_is_refused_when_the_config_loads(capsys):
    with pytest.raises(ConfigError, match=r"stages\[0\]\.scorers\[0\] 'text_relevance' needs context "
                                          r"'text_embedder', which a stage inside the LLM does not have"):
        load_config("fastv", ["stages.0.scorers.0.name=text_relevance"])
    assert main(["config", "fastv", "stages.0.scorers.0.name=text_relevance"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_run_folder_loads_as_a_table_with_int_budgets(tmp_path):
    pd = pytest.importorskip("pandas")
    rows = [{"model": "m", "status": "done", "method": "full", "budget": None, "metrics": {"flops.ratio": 1.0}},
            {"model": "m", "status": "done", "method": "dpp", "budget": 16, "metrics": {"flops.ratio": 0.1}}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    frame = resprune.ResultTable.load(tmp_path).to_pandas()
    assert str(frame["budget"].dtype) == "Int64" and frame["budget"].tolist()[1] == 16
    assert pd.isna(frame["budget"].tolist()[0])
    rows.append({"model": "m", "status": "done", "method": "dpp", "budget": 0.25, "metrics": {"flops.ratio": 0.2}})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert resprune.ResultTable.load(tmp_path).to_pandas()["budget"].tolist()[1:] == [16, 0.25]
