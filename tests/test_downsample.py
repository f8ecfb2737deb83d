"""The `downsample` baseline: the image resized before the processor so that the vision tower
itself yields at most the budget (VTC-Bench's baseline)."""

from __future__ import annotations

import functools
from importlib import resources

import pytest
import torch
from PIL import Image

import resprune
from resprune.errors import InvalidInputError
from resprune.models import chat_inputs
from resprune.strategies.downsample import downsample_image, visual_token_count
from resprune.testing.tiny import tiny_lvlm


@functools.cache
def model(model_type: str):
    return tiny_lvlm(model_type, seed=0)


def photo(name: str = "chelsea.jpg") -> Image.Image:
    return Image.open(resources.files("resprune") / "data" / "photos" / name).convert("RGB")


def scaled(image: Image.Image, factor: float) -> Image.Image:
    return image.resize((round(image.width * factor), round(image.height * factor)), resample=Image.BICUBIC)


@pytest.mark.parametrize("budget", [16, 40, 0.25, 0.15])
def test_qwen_gets_the_largest_image_whose_tokens_fit_the_budget(budget):
    _, proc = model("qwen2_5_vl")
    image = photo()
    full = visual_token_count(proc, image)
    k = budget if isinstance(budget, int) else max(1, int(budget * full + 0.5))
    small = downsample_image(image, budget, proc)
    count = visual_token_count(proc, small)
    assert count <= k < full
    assert small.width / small.height == pytest.approx(image.width / image.height, rel=0.05)
    # the largest such size: one pixel more on the short side gives more than the budget
    grow = (small.height + 1) / small.height if small.height <= small.width else (small.width + 1) / small.width
    bigger = image.resize((round(small.width * grow), round(small.height * grow)), resample=Image.BICUBIC)
    assert visual_token_count(proc, bigger) > k or bigger.size == image.size
    # VTC-Bench's resampling (PIL bicubic) of the image as given
    assert small.tobytes() == image.resize(small.size, resample=Image.BICUBIC).tobytes()


@pytest.mark.parametrize("model_type, budget", [("qwen2_5_vl", 0.25), ("qwen2_5_vl", 30), ("llava_next", 0.5)])
def test_the_llm_gets_the_processors_count_for_the_resized_image_and_never_more_than_the_budget(model_type, budget):
    lvlm, proc = model(model_type)
    image = photo("astronaut.jpg")
    pipe = resprune.load_pipeline("downsample", budget=budget)
    small = pipe.prepare_images([image], proc)[0]
    full = visual_token_count(proc, image)
    k = budget if isinstance(budget, int) else max(1, int(budget * full + 0.5))
    with pipe.attach(lvlm, proc) as attached, torch.no_grad():
        lvlm(**chat_inputs(proc, [small], ["What is in the picture?"]))
    (sel,) = attached.selections
    assert sel.n == sel.k == visual_token_count(proc, small) <= k < full


def test_keep_all_hands_the_image_over_untouched_and_is_the_unpruned_model():
    lvlm, proc = model("qwen2_5_vl")
    image = photo()
    pipe = resprune.load_pipeline("downsample", budget=100000)
    (same,) = pipe.prepare_images([image], proc)
    assert same is image
    inputs = chat_inputs(proc, [image], ["What is in the picture?"])
    with torch.no_grad():
        want = lvlm(**inputs).logits
        with pipe.attach(lvlm, proc):
            got = lvlm(**inputs).logits
    assert torch.equal(got, want)


def test_fixed_resolution_backbones_are_pointed_at_pool():
    _, proc = model("llava")
    half = visual_token_count(proc, photo()) // 2
    with pytest.raises(InvalidInputError, match=r"fixed-resolution processor.*selector 'pool'"):
        downsample_image(photo(), half, proc)
    _, proc = model("llava_next")
    with pytest.raises(InvalidInputError, match=r"no smaller version into fewer than \d+, so downsampling.*'pool'"):
        downsample_image(photo(), 1, proc)  # the base tile alone is more than one token
    _, proc = model("qwen2_5_vl")
    with pytest.raises(InvalidInputError, match=r"no smaller version into fewer than \d+"):
        downsample_image(photo(), 1, proc)  # the processor's min_pixels


def test_an_image_the_pipeline_did_not_resize_is_refused_not_kept_whole():
    lvlm, proc = model("qwen2_5_vl")
    image = photo()
    with resprune.load_pipeline("downsample", budget=16).attach(lvlm, proc), torch.no_grad():
        with pytest.raises(InvalidInputError, match="prepare_images"):
            lvlm(**chat_inputs(proc, [image], ["What is in the picture?"]))


def test_a_sweep_counts_flops_against_the_image_as_given(tmp_path):
    lvlm, proc = model("qwen2_5_vl")
    study = resprune.Ablation("resprune-qwen2.5-vl", {"base": ["downsample", "pool"], "budget": [16]}, model=lvlm,
                              processor=proc, model_name="tiny:qwen2_5_vl", limit=2, max_new_tokens=2,
                              metrics=["fidelity", "flops", "reconstruction"], progress=False)
    rows = {r["method"]: r for r in study.run(tmp_path)}
    down, pool = rows["downsample"], rows["pool"]
    assert down["status"] == "done" and pool["status"] == "done"
    assert down["metrics"]["flops.ratio"] < 1.0
    assert "reconstruction.residual" not in down["metrics"]  # not the tokens it was pruned from: not measured
    assert "reconstruction.residual" in pool["metrics"]
