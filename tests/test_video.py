"""Videos on Qwen2.5-VL: frames packed as its video processor packs them, keep-all identity, and
pruned forward / generate against the unpruned model with the dropped video tokens masked out and
every kept token at its original (time, row, column) M-RoPE position."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import resprune
from resprune.data import photo_path
from resprune.errors import InvalidInputError
from resprune.models import load_model
from resprune.video import Video, qwen_video_inputs, video_chat_inputs


@functools.cache
def qwen():
    return load_model("tiny:qwen2_5_vl")


@functools.cache
def clip(frames: int = 6, name: str = "coffee", size: tuple[int, int] = (112, 84)) -> Video:
    """A slow pan across a bundled photo."""
    photo = Image.open(photo_path(name)).convert("RGB")
    step = max(1, (photo.width - photo.height) // max(frames, 1))
    return Video([photo.crop((i * step, 0, i * step + photo.height, photo.height)).resize(size)
                  for i in range(frames)], fps=2.0)


def still(name: str = "rocket", size: tuple[int, int] = (112, 84)) -> Image.Image:
    return Image.open(photo_path(name)).convert("RGB").resize(size)


BATCHES = {
    "one video": ([[clip()]], ["What happens in the video?"]),
    "video and image in one prompt": ([[still(), clip()]], ["Compare the picture and the video."]),
    "two prompts, padded": ([[clip(4)], [still(), clip(6, "chelsea")]], ["What moves?", "Describe both, please."]),
}


def inputs_of(case: str):
    media, prompts = BATCHES[case]
    return video_chat_inputs(qwen()[1], media, prompts)


def test_frames_are_packed_as_the_video_processor_packs_them():
    """Against a literal loop over (time patch, 2x2 group, row, column), the layout of
    Qwen2VLVideoProcessor.patchify: each row holds C x 2 frames x 14 x 14 values."""
    _, proc = qwen()
    video = clip(5)  # odd: the last frame is repeated to fill the temporal patch
    packed = qwen_video_inputs([video], proc)
    t, gh, gw = packed["video_grid_thw"][0].tolist()
    assert (t, gh, gw) == (3, 6, 8) and packed["pixel_values_videos"].shape == (t * gh * gw, 3 * 2 * 14 * 14)
    ip = proc.image_processor
    frames = [torch.from_numpy(np.asarray(f.resize((gw * 14, gh * 14), Image.BICUBIC), dtype=np.float32)) / 255.0
              for f in video.frames]
    frames.append(frames[-1])
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    frames = [((f - mean) / std).permute(2, 0, 1) for f in frames]  # [C, H, W]
    rows = []
    for ti in range(t):
        for bh in range(gh // 2):
            for bw in range(gw // 2):
                for mh in range(2):
                    for mw in range(2):
                        r, c = (bh * 2 + mh) * 14, (bw * 2 + mw) * 14
                        rows.append(torch.stack([frames[2 * ti + k][:, r:r + 14, c:c + 14] for k in range(2)], dim=1)
                                    .reshape(-1))  # C, temporal, 14, 14
    torch.testing.assert_close(packed["pixel_values_videos"], torch.stack(rows), rtol=0, atol=1e-6)
    assert packed["second_per_grid_ts"].tolist() == [1.0]  # 2 frames per temporal patch at 2 fps


def test_the_real_video_processor_agrees_where_torchvision_imports():
    pytest.importorskip("torchvision", reason="transformers' video processors need torchvision")
    from transformers import Qwen2VLVideoProcessor

    _, proc = qwen()
    ip = proc.image_processor
    real = Qwen2VLVideoProcessor(min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
    frames = torch.stack([torch.from_numpy(np.asarray(f)).permute(2, 0, 1) for f in clip(6).frames])
    theirs = real(videos=[frames], return_tensors="pt", do_sample_frames=False)
    ours = qwen_video_inputs([clip(6)], proc)
    assert torch.equal(theirs["video_grid_thw"], ours["video_grid_thw"])
    torch.testing.assert_close(theirs["pixel_values_videos"], ours["pixel_values_videos"], rtol=0, atol=0.05)


@pytest.mark.parametrize("case", sorted(BATCHES))
def test_keep_all_on_videos_is_bit_identical(case):
    model, proc = qwen()
    inputs = inputs_of(case)
    with torch.no_grad():
        logits = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with resprune.load_pipeline("resprune-qwen2.5-vl", budget=1.0).attach(model, proc) as attached, torch.no_grad():
        assert torch.equal(model(**inputs).logits, logits)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), gen)
    videos = inputs["video_grid_thw"].tolist()
    assert sorted(s.n for s in attached.selections if s.geometry.layout["kind"] == "video") == \
        sorted(t * h * w // 4 for t, h, w in videos)


def masked_reference(model, inputs, attached, call: str) -> dict:
    """The unpruned inputs with every dropped image or video token masked out of attention and every
    token at the position the unpruned prompt gives it (M-RoPE time, row and column)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].clone()
    cols = attached.last.columns
    kept = torch.zeros_like(mask, dtype=torch.bool)
    rows = torch.arange(ids.shape[0])[:, None].expand_as(cols)
    kept[rows[cols >= 0], cols[cols >= 0]] = True
    visual = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
    mask[visual & ~kept] = 0
    pos3, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], inputs.get("image_grid_thw"),
                                         inputs["video_grid_thw"], inputs["second_per_grid_ts"],
                                         attention_mask=inputs["attention_mask"])
    ref = {**inputs, "attention_mask": mask}
    if call == "generate":
        text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        ref["position_ids"] = torch.cat([text[None], pos3], dim=0)
    else:
        ref["position_ids"] = pos3
    return ref


@pytest.mark.parametrize("case", sorted(BATCHES))
@pytest.mark.parametrize("config", ["resprune-qwen2.5-vl", "divprune", "dpp"])
def test_pruned_videos_equal_the_masked_unpruned_model(case, config):
    model, proc = qwen()
    inputs = inputs_of(case)
    with resprune.load_pipeline(config, budget=0.3).attach(model, proc) as attached, torch.no_grad():
        logits = model(**inputs).logits
        fwd_ref = masked_reference(model, inputs, attached, "forward")
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        gen_ref = masked_reference(model, inputs, attached, "generate")
    with torch.no_grad():
        ref_logits = model(**fwd_ref).logits
        ref = model.generate(**gen_ref, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    cols = attached.last.columns
    for r in range(cols.shape[0]):
        valid = cols[r] >= 0
        torch.testing.assert_close(logits[r, valid], ref_logits[r, cols[r][valid]], rtol=0, atol=1e-5)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for sel in attached.selections:
        assert sel.k == resprune.resolve_budget(0.3, sel.n)


def test_kept_video_tokens_keep_their_time_positions():
    model, proc = qwen()
    inputs = inputs_of("video and image in one prompt")
    full, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                         inputs["video_grid_thw"], inputs["second_per_grid_ts"],
                                         attention_mask=inputs["attention_mask"])
    with resprune.load_pipeline("resprune-qwen2.5-vl", budget=5).attach(model, proc) as attached, torch.no_grad():
        model(**inputs)
    cols = attached.last.columns[0]
    assert torch.equal(attached.last.extra["position_ids"][:, 0], full[:, 0, cols])
    video = next(s for s in attached.selections if s.geometry.layout["kind"] == "video")
    t, rows, cols_ = video.geometry.layout["temporal"], *video.geometry.layout["grid"]
    times = video.kept // (rows * cols_)  # the temporal patch of each kept token
    assert video.k == 5 and int(times.max()) < t


def test_videos_that_do_not_match_the_prompt_are_named():
    model, proc = qwen()
    inputs = inputs_of("one video")
    other = qwen_video_inputs([clip(8)], proc)  # a longer clip than the prompt has tokens for
    bad = {**inputs, **other}
    with resprune.load_pipeline("resprune-qwen2.5-vl", budget=4).attach(model, proc), torch.no_grad(), \
            pytest.raises(InvalidInputError, match="image tokens|image and video tokens"):
        model(**bad)
    with pytest.raises(InvalidInputError, match="one size"):
        Video([still(size=(112, 84)), still(size=(84, 112))])
    with pytest.raises(InvalidInputError, match="PIL images or resprune.video.Video"):
        video_chat_inputs(proc, [["not media"]], ["hi"])
