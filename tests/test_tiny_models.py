"""The tiny offline LVLMs of resprune.testing.tiny: build, determinism, forward, generate."""

from __future__ import annotations

import importlib.resources
import socket

import pytest
import torch
from PIL import Image

from resprune.testing.tiny import tiny_inputs, tiny_lvlm

MODEL_TYPES = ["llava", "llava_next", "qwen2_5_vl"]
CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
PROMPTS = ["What is shown?", "Describe the picture in one word."]


def _photo(name: str, width: int = 168) -> Image.Image:
    path = importlib.resources.files("resprune") / "data" / "photos" / name
    with importlib.resources.as_file(path) as p, Image.open(p) as im:
        im = im.convert("RGB")
        return im.resize((width, round(width * im.height / im.width)), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Two different real photos of different shapes (square astronaut, 3:2 cat)."""
    return [_photo("astronaut.jpg"), _photo("chelsea.jpg")]


@pytest.fixture
def no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("tiny_lvlm tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _image_features(model_type: str, model, batch) -> list[torch.Tensor]:
    inner = model.model
    if model_type == "llava":
        out = inner.get_image_features(pixel_values=batch["pixel_values"])
    elif model_type == "llava_next":
        out = inner.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    else:
        out = inner.get_image_features(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    return list(out.pooler_output)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_builds_offline(model_type, no_network):
    model, processor = tiny_lvlm(model_type)
    assert type(model).__name__ == CLASSES[model_type]
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    tok = processor.tokenizer
    assert tok.padding_side == "left"
    assert model.config.get_text_config().vocab_size == len(tok) == model.get_input_embeddings().num_embeddings
    assert tok.convert_tokens_to_ids(processor.image_token) == model.config.image_token_id
    gen = model.generation_config
    assert gen.pad_token_id is not None and gen.eos_token_id is not None and not gen.do_sample
    assert sum(p.numel() for p in model.parameters()) < 500_000


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_chat_template(model_type):
    _, processor = tiny_lvlm(model_type)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if model_type == "qwen2_5_vl":
        expected = (
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
    else:
        expected = "USER: <image>\nWhat is shown? ASSISTANT:"
    assert text == expected


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_seed_determinism(model_type):
    rng = torch.get_rng_state()
    a = tiny_lvlm(model_type, seed=0)[0].state_dict()
    b = tiny_lvlm(model_type, seed=0)[0].state_dict()
    c = tiny_lvlm(model_type, seed=1)[0].state_dict()
    assert torch.equal(torch.get_rng_state(), rng), "caller's RNG state changed"
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    differ = [k for k in a if not torch.equal(a[k], c[k])]
    assert len(differ) > len(a) // 2


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_forward_generate_and_token_counts(model_type, photos):
    model, processor = tiny_lvlm(model_type)
    batch = tiny_inputs(model_type, processor, photos, PROMPTS)
    ids = batch["input_ids"]
    assert ids.shape[0] == 2 and (batch["attention_mask"][:, -1] == 1).all(), "expected left padding"

    with torch.no_grad():
        logits = model(**batch).logits
        feats = _image_features(model_type, model, batch)
    assert logits.shape == (*ids.shape, len(processor.tokenizer))
    assert torch.isfinite(logits).all()

    counts = (ids == model.config.image_token_id).sum(dim=1).tolist()
    assert counts == [f.shape[0] for f in feats]
    assert all(f.shape[-1] == model.config.get_text_config().hidden_size for f in feats)
    if model_type == "llava":
        assert counts == [36, 36]  # 84 px / patch 14 -> 6x6 grid, CLS dropped
    else:  # different photo shapes -> different token counts
        assert counts[0] > counts[1]

    out = model.generate(**batch, max_new_tokens=4)
    again = model.generate(**batch, max_new_tokens=4)
    assert out.shape == (2, ids.shape[1] + 4)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    assert torch.equal(out, again)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_sdpa_matches_eager(model_type, photos):
    sdpa, processor = tiny_lvlm(model_type, attn_implementation="sdpa")
    eager, _ = tiny_lvlm(model_type, attn_implementation="eager")
    assert eager.config.get_text_config()._attn_implementation == "eager"
    assert eager.config.vision_config._attn_implementation == "eager"
    batch = tiny_inputs(model_type, processor, photos, PROMPTS)
    with torch.no_grad():
        a = sdpa(**batch).logits
        b = eager(**batch).logits
    # Left-padding positions attend to nothing; eager and sdpa fill those rows differently.
    valid = batch["attention_mask"].bool()
    assert not valid.all()
    torch.testing.assert_close(a[valid], b[valid], atol=1e-5, rtol=0)


def test_image_size_override():
    model, processor = tiny_lvlm("llava", image_size=112)
    batch = tiny_inputs("llava", processor, [_photo("coffee.jpg")], ["What is shown?"])
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 64  # 8x8 grid
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_qwen_token_count_and_text_only_row(photos):
    model, processor = tiny_lvlm("qwen2_5_vl")
    img_id = model.config.image_token_id
    small = tiny_inputs("qwen2_5_vl", processor, [photos[0].resize((112, 84))], ["What is shown?"])
    assert int((small["input_ids"] == img_id).sum()) == 12  # grid (1, 6, 8) after 2x2 merge
    batch = tiny_inputs("qwen2_5_vl", processor, [photos[0], None], ["What is shown?", "Say hello."])
    counts = (batch["input_ids"] == img_id).sum(dim=1).tolist()
    assert counts[0] > 12 and counts[1] == 0
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    out = model.generate(**batch, max_new_tokens=4)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)


def test_tiny_inputs_rejects_bad_arguments(photos):
    _, processor = tiny_lvlm("llava")
    with pytest.raises(ValueError, match="only supported for qwen2_5_vl"):
        tiny_inputs("llava", processor, [None], ["hi"])
    with pytest.raises(ValueError, match="images for"):
        tiny_inputs("llava", processor, photos, ["hi"])
    with pytest.raises(ValueError, match="unknown model_type"):
        tiny_lvlm("blip2")
