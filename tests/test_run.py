"""The model jobs: costs (Eq. 18), ``resprune demo`` / ``run`` / ``visualize`` on tiny models, overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import resprune
from resprune.cli import main
from resprune.costs import LLMDims, kv_cache_bytes, llm_dims, prefill_flops
from resprune.data import photo_path, sample_questions
from resprune.models import chat_inputs, load_model
from resprune.visualize import overlay_selection

PNG = b"\x89PNG\r\n\x1a\n"


def test_prefill_flops_is_eq_18_summed_over_layers():
    dims = LLMDims(hidden=4096, intermediate=11008, layers=32, kv_heads=32, head_dim=128)
    t = 2200
    per_layer = 8 * t * 4096**2 + 4 * t**2 * 4096 + 6 * t * 4096 * 11008
    assert prefill_flops(dims, t) == pytest.approx(32 * per_layer)
    # the paper's Table VIII: LLaVA-NeXT-7B with ~2.2k tokens is about 30.6 TFLOPs
    assert 29e12 < prefill_flops(dims, t) < 32e12
    assert kv_cache_bytes(dims, 1000) == 2 * 32 * 32 * 128 * 1000 * 2


def test_a_sliding_attention_layer_attends_to_at_most_its_window_in_flops_and_kv_cache():
    """Gemma 3's local layers: Eq. 18's T^2 term becomes T min(T, W), and the KV cache holds min(T, W)."""
    from resprune.testing.tiny import tiny_lvlm

    model, _ = tiny_lvlm("gemma3", text_layers=4)
    dims = llm_dims(model.config)
    assert dims.windows == (512, None, 512, None)  # sliding, full, sliding, full
    d, m = dims.hidden, dims.intermediate

    def layer(t, keys):
        return 8 * t * d * d + 4 * t * keys * d + 6 * t * d * m

    assert prefill_flops(dims, 2000) == pytest.approx(2 * layer(2000, 512) + 2 * layer(2000, 2000))
    assert prefill_flops(dims, 300) == pytest.approx(4 * layer(300, 300))  # within the window: Eq. 18 as is
    assert prefill_flops(dims, [(0, 2000), (2, 400)]) == pytest.approx(
        layer(2000, 512) + layer(2000, 2000) + layer(400, 400) + layer(400, 400))
    per_token = 2 * dims.kv_heads * dims.head_dim * 2
    assert kv_cache_bytes(dims, 2000) == per_token * (512 + 2000 + 512 + 2000)
    assert llm_dims(load_model("tiny:qwen2_5_vl")[0].config).windows == ()  # full attention everywhere


def test_a_linear_attention_layer_costs_what_its_weights_and_state_say_and_holds_no_kv_cache():
    """Qwen3.5's Gated DeltaNet layers: per token, 2 FLOPs per weight of its projections and of its
    depthwise convolution (counted here from the module's own weights) and 8 d_k d_v per value head
    for the recurrent state, plus the MLP; no T^2 term and no KV cache. Full layers keep Eq. 18."""
    from resprune.testing.tiny import tiny_lvlm

    model, _ = tiny_lvlm("qwen3_5", text_layers=4)
    dims = llm_dims(model.config)
    assert dims.linear == (True, True, True, False) and dims.windows == ()
    mixer = model.model.language_model.layers[0].linear_attn
    weights = sum(p.numel() for name, p in mixer.named_parameters() if name.startswith(("in_proj", "out_proj")))
    state = 8 * mixer.num_v_heads * mixer.head_k_dim * mixer.head_v_dim
    per_token = 2 * weights + 2 * mixer.conv1d.weight.numel() + state
    d, m = dims.hidden, dims.intermediate
    assert dims.linear_attention.flops_per_token(d) == per_token
    full = 8 * 100 * d * d + 4 * 100 * 100 * d + 6 * 100 * d * m
    assert prefill_flops(dims, 100) == pytest.approx(3 * 100 * (per_token + 6 * d * m) + full)
    assert prefill_flops(dims, [(0, 100), (3, 40)]) == pytest.approx(
        3 * 100 * (per_token + 6 * d * m) + 8 * 40 * d * d + 4 * 40 * 40 * d + 6 * 40 * d * m)
    assert kv_cache_bytes(dims, 100) == 2 * dims.kv_heads * dims.head_dim * 2 * 100  # the full layer only


def test_llm_dims_read_from_a_model_config():
    model, _ = load_model("tiny:qwen2_5_vl")
    dims = llm_dims(model.config)
    text = model.config.get_text_config()
    assert (dims.hidden, dims.layers, dims.intermediate) == (text.hidden_size, text.num_hidden_layers,
                                                             text.intermediate_size)


def test_demo_prints_costs_and_writes_an_overlay(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--max-new-tokens", "3"]) == 0
    text = capsys.readouterr().out
    assert "tiny randomly initialised" in text and "--model" in text
    assert "kept 128 of 576 visual tokens" in text
    assert "prefill FLOPs" in text and "-" in text
    assert out.read_bytes().startswith(PNG)


@pytest.mark.parametrize("model", ["tiny:llava_next", "tiny:qwen2_5_vl"])
def test_demo_on_other_backbones_with_a_budget(tmp_path, capsys, model):
    out = tmp_path / "demo.png"
    assert main(["demo", "--model", model, "--budget", "0.25", "--photo", "chelsea", "--out", str(out),
                 "--max-new-tokens", "2"]) == 0
    text = capsys.readouterr().out
    assert "pruned)" in text and out.read_bytes().startswith(PNG)


def test_run_and_visualize_commands(tmp_path, capsys):
    image = str(photo_path("coffee"))
    out = tmp_path / "o.png"
    assert main(["run", "resprune-qwen2.5-vl", "budget=8", "--model", "tiny:qwen2_5_vl", "--image", image,
                 "--prompt", "What color is the cup?", "--max-new-tokens", "3", "--compare", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "kept 8 of" in text and "answer:" in text and "answer without pruning:" in text
    assert out.read_bytes().startswith(PNG)
    vis = tmp_path / "v.png"
    assert main(["visualize", "resprune-llava15", "budget=16", "--model", "tiny:llava", "--image", image,
                 "--out", str(vis)]) == 0
    assert "kept 16 of 576" in capsys.readouterr().out and vis.read_bytes().startswith(PNG)


def test_cli_reports_bad_model_and_image_without_traceback(tmp_path, capsys):
    assert main(["run", "resprune-llava15", "--model", "tiny:blip", "--image", "x.jpg", "--prompt", "q"]) == 2
    assert "unknown tiny model" in capsys.readouterr().err
    assert main(["visualize", "resprune-llava15", "--model", "tiny:llava", "--image",
                 str(tmp_path / "missing.jpg")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["demo", "--budget", "abc"]) == 2
    assert "not a budget" in capsys.readouterr().err


def test_sample_questions_point_at_bundled_photos():
    records = sample_questions()
    assert len(records) >= 4
    for rec in records:
        assert Image.open(rec["image"]).size[0] > 0 and rec["question"] and rec["answers"]


def brightness(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"), dtype=np.float32)


@pytest.mark.parametrize("model_type", ["llava", "qwen2_5_vl"])
def test_overlay_dims_dropped_cells_and_keeps_kept_ones(model_type):
    model, proc = load_model(f"tiny:{model_type}")
    image = Image.open(photo_path("rocket")).convert("RGB")
    inputs = chat_inputs(proc, [image], ["What is it?"])
    with resprune.load_pipeline("uniform", budget=0.25).attach(model, proc) as attached, torch.no_grad():
        attached.prune(inputs)
    sel = attached.selections[0]
    rows, cols = sel.geometry.grid
    plain = overlay_selection(image, sel, processor=proc, dim=1.0, outline=None)
    dimmed = overlay_selection(image, sel, processor=proc, dim=0.25, outline=None)
    a, b = brightness(plain), brightness(dimmed)
    h, w = a.shape
    ys, xs = np.linspace(0, h, rows + 1).round().astype(int), np.linspace(0, w, cols + 1).round().astype(int)
    keep = sel.mask().numpy()
    for idx in range(rows * cols):
        r, c = divmod(idx, cols)
        cell_a, cell_b = a[ys[r]:ys[r + 1], xs[c]:xs[c + 1]], b[ys[r]:ys[r + 1], xs[c]:xs[c + 1]]
        if keep[idx]:
            assert np.array_equal(cell_a, cell_b)
        else:
            assert cell_b.mean() <= 0.3 * cell_a.mean() + 1.0


def test_overlay_of_llava_next_shows_base_crop_and_newlines():
    model, proc = load_model("tiny:llava_next")
    image = Image.open(photo_path("chelsea")).convert("RGB")
    inputs = chat_inputs(proc, [image], ["What is it?"])
    with resprune.load_pipeline("resprune-llava-next", budget=100).attach(model, proc) as attached, torch.no_grad():
        attached.prune(inputs)
    sel = attached.selections[0]
    layout = sel.geometry.layout
    assert layout["crop_grid"] is not None and int(layout["newline"].sum()) == layout["crop_grid"][0]
    pic = overlay_selection(image, sel, processor=proc, panel=200)
    assert pic.height == 200 and pic.width > 2 * 200  # base view + crop view + newline strip
