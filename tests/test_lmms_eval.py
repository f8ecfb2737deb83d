"""resprune as an lmms-eval model, for real: the entry point, requests in and answers out,
the measured token counts against a reference, and `python -m lmms_eval` end to end on the
bundled offline task, then `resprune report` on its output.

Needs lmms-eval (CI installs it in a step of its own: `pip install --no-deps lmms-eval==0.7.3`
plus what it imports; see docs/lmms-eval.md). Without it these tests skip, unless
RESPRUNE_REQUIRE_LMMS_EVAL=1 (CI) makes a missing lmms-eval a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import resprune
from resprune.costs import llm_dims, prefill_flops
from resprune.data import sample_questions
from resprune.errors import ConfigError
from resprune.models import chat_inputs
from resprune.lmms import MODEL_ID, TASKS_DIR

if os.environ.get("RESPRUNE_REQUIRE_LMMS_EVAL") == "1":
    import lmms_eval  # noqa: F401 (a missing lmms-eval fails here)
else:
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (see docs/lmms-eval.md)")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402
from lmms_eval.models.model_utils.gen_metrics import get_logged_metrics_history, reset_logged_metrics  # noqa: E402
from PIL import Image  # noqa: E402

from resprune.lmms.model import ResPrune, ResPruneSimple  # noqa: E402

TASK, SPLIT = "samples", "test"
GEN = {"max_new_tokens": 3, "temperature": 0, "until": ["\n\n"]}


@pytest.fixture(scope="module")
def docs():
    out = []
    for rec in sample_questions():
        with Image.open(rec["image"]) as im:
            out.append({**rec, "picture": im.convert("RGB")})
    return out


def _messages(doc):
    return [{"role": "user", "content": [{"type": "image", "url": doc["picture"]},
                                         {"type": "text", "text": doc["question"]}]}]


def chat_requests(docs, gen=GEN):
    return [Instance("generate_until", (d["question"], _messages, dict(gen), i, TASK, SPLIT), 0,
                     {"task": TASK, "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]


def load(model_args, docs, cls=ResPrune, **extra):
    lm = cls.create_from_arg_string(model_args, {"device": "cpu", **extra})
    lm.task_dict = {TASK: {SPLIT: docs}}
    return lm


def full_lengths(lm, docs):
    """Reference: the unpruned prompt length of each request, from the processor alone."""
    return [int(chat_inputs(lm.processor, [d["picture"]], [d["question"]])["attention_mask"].sum()) for d in docs]


def last_stats():
    entry = get_logged_metrics_history()[-1]
    return {k[len("resprune."):]: v for k, v in entry.items() if k.startswith("resprune.")}


def test_entry_point_registers_both_interfaces():
    assert get_model(MODEL_ID) is ResPrune and ResPrune.is_simple is False
    assert get_model(MODEL_ID, force_simple=True) is ResPruneSimple and ResPruneSimple.is_simple is True


def test_model_args_become_pipeline_overrides(docs):
    lm = load("pretrained=tiny:llava,pipeline=resprune-llava15,budget=48,selector.params.alpha=0.25", docs,
              batch_size=2)
    assert lm.pipeline.config.budget == 48 and lm.pipeline.config.selector.params.alpha == 0.25
    assert lm.batch_size == 2 and lm.device.type == "cpu"
    for args, match in (("pipeline=none,budget=64", "pipeline=none runs the unpruned model"),
                        ("pipeline=resprune-llava15,pretrainedd=x", "model_args of lmms-eval model 'resprune'.*"
                                                                   "pretrainedd"),
                        ("pipeline=resprune-llava15,budget=-3", "budget")):
        with pytest.raises(ConfigError, match=match):
            load(f"pretrained=tiny:llava,{args}", docs)
    with pytest.raises(ConfigError, match="batch_size='auto' must be a positive integer"):
        load("pretrained=tiny:llava", docs, batch_size="auto")


def test_token_counts_match_the_reference_at_any_batch_size(docs):
    lm = load("pretrained=tiny:llava,pipeline=resprune-llava15,budget=64", docs)
    full = full_lengths(lm, docs)
    dims = llm_dims(lm.model.config)
    seen = {}
    for size in (1, 3):
        lm.batch_size_per_gpu = size
        reset_logged_metrics()
        out = lm.generate_until(chat_requests(docs))
        assert [r.token_counts.input_tokens for r in out] == [t - (576 - 64) for t in full]
        assert all(isinstance(r.text, str) and r.token_counts.output_tokens <= 3 for r in out)
        stats = last_stats()
        assert stats["tokens.visual"] == 576 and stats["tokens.visual_kept"] == 64
        assert stats["requests"] == len(docs)
        ratio = sum(prefill_flops(dims, t - 512) / prefill_flops(dims, t) for t in full) / len(full)
        assert stats["flops.ratio"] == pytest.approx(ratio)
        assert stats["latency.selection_ms"] > 0
        seen[size] = [r.token_counts.input_tokens for r in out]
    assert seen[1] == seen[3]


@pytest.mark.parametrize("model_type,pipeline", [("llava_next", "resprune-llava-next"),
                                                 ("qwen2_5_vl", "resprune-qwen2.5-vl"), ("gemma3", "resprune-gemma3"),
                                                 ("qwen3_vl", "resprune-qwen3-vl"), ("qwen3_5", "resprune-qwen3.5"),
                                                 ("internvl", "resprune-internvl")])
def test_other_backbones_batched(docs, model_type, pipeline):
    """LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and InternVL3 (its tiles): images give different token
    counts; Gemma 3: 256 each, its images nested per prompt by the processor; each request keeps 64."""
    docs = docs[:4]
    lm = load(f"pretrained=tiny:{model_type},pipeline={pipeline},budget=64", docs, batch_size=3)
    reference = [chat_inputs(lm.processor, [d["picture"]], [d["question"]]) for d in docs]
    visual = [int((r["input_ids"] == lm.image_token_id).sum()) for r in reference]
    assert len(set(visual)) > 1 or model_type == "gemma3"  # the photos' sizes differ, and so do their token counts
    reset_logged_metrics()
    out = lm.generate_until(chat_requests(docs))
    assert [r.token_counts.input_tokens for r in out] == [int(r["attention_mask"].sum()) - v + 64
                                                          for r, v in zip(reference, visual)]
    stats = last_stats()
    assert stats["tokens.visual"] == pytest.approx(sum(visual) / len(visual)) and stats["tokens.visual_kept"] == 64


def test_stages_inside_the_llm_and_the_unpruned_baseline(docs):
    lm = load("pretrained=tiny:llava:4,pipeline=fastv,budget=64", docs, batch_size=4)
    full = full_lengths(lm, docs)
    dims = llm_dims(lm.model.config)
    reset_logged_metrics()
    out = lm.generate_until(chat_requests(docs))
    assert [r.token_counts.input_tokens for r in out] == full  # every token enters the LLM
    stats = last_stats()
    assert stats["tokens.visual_kept"] == 64  # what is left after layer K
    layer = lm.pipeline.llm_stages[0].layer
    ratio = sum(prefill_flops(dims, [(0, t), (layer, t - 512)]) / prefill_flops(dims, t) for t in full) / len(full)
    assert stats["flops.ratio"] == pytest.approx(ratio)

    base = load("pretrained=tiny:llava:4,pipeline=none", docs, batch_size=4)
    reset_logged_metrics()
    out = base.generate_until(chat_requests(docs))
    assert [r.token_counts.input_tokens for r in out] == full
    stats = last_stats()
    assert stats["tokens.visual_kept"] == 576 and stats["flops.ratio"] == 1.0 and "latency.selection_ms" not in stats


def _simple_requests(docs, continuation):
    def visual(doc):
        return [doc["picture"]]

    return [Instance("loglikelihood", (d["question"], continuation, visual, i, TASK, SPLIT), 0,
                     {"task": TASK, "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]


def test_loglikelihood_against_a_plain_forward_and_generate(docs):
    docs = docs[:3]
    # unpruned: the log-probability of the continuation from one plain forward of prompt + continuation
    base = load("pretrained=tiny:llava,pipeline=none", docs, cls=ResPruneSimple)
    requests = _simple_requests(docs, "A")
    got = base.loglikelihood(requests)
    for (ll, _greedy), request in zip(got, requests, strict=True):
        inputs = base.inputs([base.request(request)], ["A"])
        with torch.no_grad():
            logits = base.model(**inputs).logits[0, -2].float()
        assert ll == pytest.approx(float(torch.log_softmax(logits, -1)[inputs["input_ids"][0, -1]]), abs=1e-5)
    # pruned: a one-token continuation's log-probability is the first step of the pruned generate()
    lm = load("pretrained=tiny:llava,pipeline=resprune-llava15,budget=32", docs, cls=ResPruneSimple)
    got = lm.loglikelihood(requests)
    token = lm.tokenizer("A", add_special_tokens=False)["input_ids"]
    assert len(token) == 1
    for (ll, greedy), request in zip(got, requests, strict=True):
        inputs = lm.inputs([lm.request(request)])
        with torch.no_grad():
            step = lm.model.generate(**inputs, max_new_tokens=1, do_sample=False, output_scores=True,
                                     return_dict_in_generate=True)
        logp = torch.log_softmax(step.scores[0][0].float(), -1)
        assert ll == pytest.approx(float(logp[token[0]]), abs=1e-4)
        assert greedy == (int(logp.argmax()) == token[0])


def _lmms_eval(out, model_args, *extra, tasks="resprune_samples"):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", MODEL_ID, "--model_args", model_args,
           "--tasks", tasks, "--include_path", str(TASKS_DIR), "--device", "cpu",
           "--output_path", str(out), "--log_samples", "--verbosity", "WARNING", *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_a_misspelt_model_args_key_stops_python_m_lmms_eval_with_an_error(tmp_path):
    """lmms-eval logs an exception raised while it builds the model and exits 0; the loops of
    docs/lmms-eval.md would skip that cell in silence, so the resprune model stops the process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", MODEL_ID, "--model_args",
           "pretrained=tiny:llava,pipeline=resprune-llava15,budgte=64", "--tasks", "resprune_samples",
           "--include_path", str(TASKS_DIR), "--device", "cpu", "--output_path", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "resprune: error:" in done.stderr and "budgte" in done.stderr
    assert not list(tmp_path.rglob("*_results.json"))


@pytest.mark.slow
def test_python_m_lmms_eval_end_to_end_then_report(tmp_path):
    """The real CLI on the bundled task: the unpruned baseline, ResPrune (chat interface,
    batched) and FastV (simple interface), then `resprune report` lays them out."""
    out = tmp_path / "lmms"
    _lmms_eval(out, "pretrained=tiny:llava:4,pipeline=none", "--batch_size", "4")
    _lmms_eval(out, "pretrained=tiny:llava:4,pipeline=resprune-llava15,budget=64", "--batch_size", "3")
    _lmms_eval(out, "pretrained=tiny:llava:4,pipeline=fastv,budget=64", "--batch_size", "2", "--force_simple")
    files = sorted(out.rglob("*_results.json"))
    assert len(files) == 3
    runs = {json.loads(f.read_text())["config"]["model_args"]: json.loads(f.read_text()) for f in files}
    rp = runs["pretrained=tiny:llava:4,pipeline=resprune-llava15,budget=64"]
    assert set(rp["results"]["resprune_samples"]) >= {"exact_match,none", "vqa_score,none"}
    assert rp["n-samples"]["resprune_samples"]["effective"] == 8
    assert rp["throughput"]["avg_resprune.tokens.visual_kept"] == 64
    assert rp["config"]["model_backend"].endswith("ResPrune (chat)")
    fastv = runs["pretrained=tiny:llava:4,pipeline=fastv,budget=64"]
    assert fastv["config"]["model_backend"].endswith("ResPruneSimple (simple)")
    # per-sample prompt lengths (lmms-eval's token_counts): ResPrune's are 512 shorter than the baseline's
    samples = {}
    for f in out.rglob("*_samples_resprune_samples.jsonl"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        samples[f.name] = {r["doc_id"]: r["token_counts"][0]["input_tokens"] for r in rows}
    lengths = sorted(samples.values(), key=lambda s: sum(s.values()))
    pruned, *unpruned = lengths  # FastV and the baseline feed every token to the first layer
    assert unpruned[0] == unpruned[1]
    assert pruned == {d: t - 512 for d, t in unpruned[0].items()}

    assert subprocess.run([sys.executable, "-m", "resprune.cli", "report", str(out), "--no-plots"],
                          capture_output=True, text=True).returncode == 0
    report = (out / "report.md").read_text()
    assert "| method | resprune_samples | tokens.visual_kept | flops.ratio | latency.selection_ms | Rel. |" in report
    lines = report.splitlines()
    assert any(line.startswith("| full |") and line.endswith("| 576 | 1 | – | – |") for line in lines)
    budget = lines.index("| **budget 64** |" + " |" * 5)
    assert [line.split(" | ")[0] for line in lines[budget + 1: budget + 3]] == ["| fastv", "| resprune-llava15"]


def test_batches_share_settings_and_cover_every_request_once():
    from resprune.lmms.model import _batches

    contexts = ["a" * n for n in (5, 50, 7, 30, 12, 40, 1)]
    settings = [{"max_new_tokens": 8}, {"max_new_tokens": 8}, {"max_new_tokens": 2}, {"max_new_tokens": 8},
                {"max_new_tokens": 2}, {"max_new_tokens": 8}, {"max_new_tokens": 8}]
    batches = _batches(contexts, settings, 2)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(len(b) <= 2 and len({repr(settings[i]) for i in b}) == 1 for b in batches)
    eights = [i for b in batches for i in b if settings[i]["max_new_tokens"] == 8]
    assert eights == [1, 5, 3, 0, 6]  # longest first within the same settings


def test_python_m_lmms_eval_on_the_bundled_video_questions(tmp_path):
    """A video task through the real CLI: the bundled clip read with PyAV (8 frames), pruned on
    Qwen2.5-VL (chat interface, batched) and LLaVA-OneVision with DyCoke (simple interface); the
    visual tokens in and kept are the clip's."""
    pytest.importorskip("av", reason="video files need PyAV (the lmms-eval extra)")
    from resprune.data import video_path
    from resprune.models import load_model
    from resprune.video import read_video_file, video_chat_inputs

    clip = read_video_file(video_path("cut"), 8)
    _, qwen_proc = load_model("tiny:qwen2_5_vl")
    n = int((video_chat_inputs(qwen_proc, [[clip]], ["?"])["input_ids"] == qwen_proc.video_token_id).sum())
    out = tmp_path / "lmms"
    _lmms_eval(out, "pretrained=tiny:qwen2_5_vl,pipeline=resprune-video,budget=0.25,max_frames=8", "--batch_size", "2",
               tasks="resprune_video_samples")
    _lmms_eval(out, "pretrained=tiny:llava_onevision,pipeline=dycoke,max_frames=8", "--force_simple",
               tasks="resprune_video_samples")
    runs = {json.loads(f.read_text())["config"]["model_args"]: json.loads(f.read_text())
            for f in sorted(out.rglob("*_results.json"))}
    qwen = runs["pretrained=tiny:qwen2_5_vl,pipeline=resprune-video,budget=0.25,max_frames=8"]
    assert qwen["n-samples"]["resprune_video_samples"]["effective"] == 2
    assert set(qwen["results"]["resprune_video_samples"]) >= {"exact_match,none", "vqa_score,none"}
    assert qwen["throughput"]["avg_resprune.tokens.visual"] == n
    assert qwen["throughput"]["avg_resprune.tokens.visual_kept"] == resprune.resolve_budget(0.25, n)
    ov = runs["pretrained=tiny:llava_onevision,pipeline=dycoke,max_frames=8"]
    assert ov["config"]["model_backend"].endswith("ResPruneSimple (simple)")
    per = 14 * 14  # 8 frames of 14 x 14 pooled tokens and a newline; DyCoke keeps frames 0, 4, 6 whole
    assert ov["throughput"]["avg_resprune.tokens.visual"] == 8 * per + 1
    assert ov["throughput"]["avg_resprune.tokens.visual_kept"] == 1 + 3 * per + 5 * int(0.3 * per)
