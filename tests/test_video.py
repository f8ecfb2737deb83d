"""Videos on Qwen2.5-VL: frames packed as its video processor packs them, keep-all identity, and
pruned forward / generate against the unpruned model with the dropped video tokens masked out and
every kept token at its original (time, row, column) M-RoPE position."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import resprune
from resprune.data import photo_path
from resprune.errors import InvalidInputError
from resprune.models import load_model
from resprune.testing.conformance import assert_equal_at_kept_columns, masked_out_dropped, pruned_forward_positions
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


def assert_keep_all_is_identical(model, proc, inputs, config: str) -> list:
    """Keep-all forward and ``generate`` equal the unpruned model's, bit for bit; the videos' selections."""
    with torch.no_grad():
        logits = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with resprune.load_pipeline(config, budget=1.0).attach(model, proc) as attached, torch.no_grad():
        assert torch.equal(model(**inputs).logits, logits)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), gen)
    return [s for s in attached.selections if s.geometry.layout["kind"] == "video"]


@pytest.mark.parametrize("case", sorted(BATCHES))
def test_keep_all_on_videos_is_bit_identical(case):
    inputs = inputs_of(case)
    selections = assert_keep_all_is_identical(*qwen(), inputs, "resprune-qwen2.5-vl")
    videos = inputs["video_grid_thw"].tolist()
    assert sorted(s.n for s in selections) == \
        sorted(t * h * w // 4 for t, h, w in videos)


def masked_reference(model, inputs, attached, call: str) -> dict:
    """The unpruned inputs with every dropped image or video token masked out of attention and every
    token at the position the unpruned prompt gives it (M-RoPE time, row and column; Qwen2.5-VL and
    Qwen3-VL)."""
    ref = masked_out_dropped(model, inputs, attached)
    mask = ref["attention_mask"]
    pos3, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs.get("image_grid_thw"),
                                         video_grid_thw=inputs["video_grid_thw"],
                                         second_per_grid_ts=inputs.get("second_per_grid_ts"),  # Qwen2.5-VL's
                                         attention_mask=inputs["attention_mask"])
    if call == "generate":
        text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        ref["position_ids"] = torch.cat([text[None], pos3], dim=0)
    else:
        ref["position_ids"] = pos3
    return ref


def assert_pruned_equals_masked(model, proc, inputs, config: str, reference) -> None:
    """Pruned forward and ``generate`` (budget 0.3) against the unpruned model on ``reference``'s
    masked inputs: the logits at every kept column, the tokens and the per-step logits."""
    with resprune.load_pipeline(config, budget=0.3).attach(model, proc) as attached, torch.no_grad():
        logits = model(**inputs).logits
        fwd_ref = reference(model, inputs, attached, "forward")
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        gen_ref = reference(model, inputs, attached, "generate")
    with torch.no_grad():
        ref_logits = model(**fwd_ref).logits
        ref = model.generate(**gen_ref, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    assert_equal_at_kept_columns(logits, ref_logits, attached.last.columns)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for sel in attached.selections:
        assert sel.k == resprune.resolve_budget(0.3, sel.n)


@pytest.mark.parametrize("case", sorted(BATCHES))
@pytest.mark.parametrize("config", ["resprune-qwen2.5-vl", "divprune", "dpp"])
def test_pruned_videos_equal_the_masked_unpruned_model(case, config):
    assert_pruned_equals_masked(*qwen(), inputs_of(case), config, masked_reference)


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


# --- budgets over time -------------------------------------------------------------------------------


def encoded_video(t: int, rows: int, cols: int, d: int = 16, seed: int = 0):
    from resprune.image_selection import EncodedImage

    gen = torch.Generator().manual_seed(seed)
    frame = torch.stack([torch.arange(rows, dtype=torch.float32).repeat_interleave(cols),
                         torch.arange(cols, dtype=torch.float32).repeat(rows)], dim=1)
    return EncodedImage(torch.randn(t * rows * cols, d, generator=gen), positions=frame.repeat(t, 1),
                        frames=torch.arange(t).repeat_interleave(rows * cols),
                        layout={"kind": "video", "grid": (rows, cols), "temporal": t})


def select(pipe, video):
    from resprune.image_selection import select_images

    (sel,) = select_images(pipe, [video], [0], lambda r: "", None)
    return sel


@settings(max_examples=60, deadline=None)
@given(t=st.integers(1, 8), rows=st.integers(1, 4), cols=st.integers(1, 4), budget=st.integers(1, 200),
       selector=st.sampled_from(["residual_energy", "divprune", "random"]))
def test_uniform_allocation_spends_the_budget_exactly_and_evenly_over_frames(t, rows, cols, budget, selector):
    video = encoded_video(t, rows, cols)
    sel = select(resprune.Pipeline(selector, budget=budget, video_allocation="uniform"), video)
    per_frame = torch.bincount(video.frames[sel.kept], minlength=t)
    assert sel.k == int(per_frame.sum()) == min(budget, video.n)  # adds up exactly
    assert int(per_frame.max()) - int(per_frame.min()) <= 1  # equal shares, largest remainder
    assert per_frame.tolist() == sorted(per_frame.tolist(), reverse=True)  # the remainder goes to earlier frames


def test_global_allocation_is_one_selection_over_every_frame():
    video = encoded_video(4, 3, 3)
    sel = select(resprune.Pipeline("residual_energy", budget=12), video)
    alone = resprune.select(video.features[None], 12)  # the whole clip as one set of tokens, [1, k] sorted
    assert sel.kept.tolist() == alone[0].tolist()


def test_a_plugin_reads_each_tokens_frame():
    from resprune import PruneContext, Selector

    class LatestFrames(Selector):
        name = "latest_frames"
        requires = frozenset({"frames"})

        def select(self, tokens, k, scores, context: PruneContext):
            frames = context.get("frames")  # int [N], shared by the images of the batch, like tiles
            order = torch.argsort(-frames.float() * tokens.shape[1] + torch.arange(tokens.shape[1]))
            return order[:k].expand(tokens.shape[0], k)

    video = encoded_video(3, 2, 2)
    sel = select(resprune.Pipeline(LatestFrames(), budget=4), video)
    assert video.frames[sel.kept].tolist() == [2, 2, 2, 2]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 12), d=st.integers(2, 12), t=st.integers(2, 5), k=st.integers(1, 30), seed=st.integers(0, 99))
def test_on_a_static_clip_resprune_keeps_one_copy_of_each_token_until_the_frame_span_is_exhausted(n, d, t, k, seed):
    frame = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    clip_tokens = frame.repeat(t, 1)  # t identical frames
    k = min(k, n * t)
    from resprune.linalg import DEFAULT_TOL, greedy_residual_select

    trace: list[torch.Tensor] = []  # residual energies after each pick
    picks = greedy_residual_select(clip_tokens[None], k, trace=trace)[0]
    floor = DEFAULT_TOL * clip_tokens.pow(2).sum(-1)  # the selector's own "inside the kept span"
    # the span is exhausted once no token's residual is above its floor (then the fixed fallback order runs)
    live = 1 + sum(1 for energy in trace[:-1] if bool((energy[0] > floor).any()))
    places = (picks[:live] % n).tolist()  # the place in the frame of each pick while the span is not exhausted
    assert len(set(places)) == len(places)


def test_a_static_video_keeps_distinct_places_end_to_end():
    model, proc = qwen()
    frame = still("astronaut")
    video = Video([frame] * 6, fps=2.0)  # 3 identical temporal patches of 12 tokens
    inputs = video_chat_inputs(proc, [[video]], ["What moves?"])
    with resprune.load_pipeline("resprune-qwen2.5-vl", budget=8).attach(model, proc) as attached, torch.no_grad():
        model(**inputs)
    (sel,) = attached.selections
    places = (sel.kept % 12).tolist()
    assert sel.k == 8 and len(set(places)) == 8  # no place of the frame kept twice


def test_video_allocation_is_a_config_key():
    cfg = resprune.load_config("resprune-qwen2.5-vl", ["video.allocation=uniform"])
    assert resprune.Pipeline.from_config(cfg).video_allocation == "uniform"
    with pytest.raises(resprune.ConfigError, match="video.allocation='unifrom'.*Did you mean 'uniform'"):
        resprune.load_config("resprune-qwen2.5-vl", ["video.allocation=unifrom"])


# --- demo clips and pictures ---------------------------------------------------------------------------


def test_on_a_cut_resprune_spends_nothing_on_repeated_frames(tmp_path, capsys):
    from resprune.cli import main

    out = tmp_path / "sheet.png"
    assert main(["demo", "--video", "cut", "--out", str(out), "--max-new-tokens", "2"]) == 0
    text = capsys.readouterr().out
    found = [line for line in text.splitlines() if line.startswith("kept ")]
    assert found and "4 frame pairs of 6x8" in found[0]
    per_pair = [int(x) for x in found[0].split("[")[1].rstrip("]").split(",")]
    # frames 0-3 show one photo, 4-7 another: the second pair of each shot repeats the first
    assert per_pair[1] == per_pair[3] == 0 and per_pair[0] > 0 and per_pair[2] > 0 and sum(per_pair) == 48
    sheet = Image.open(out)
    assert sheet.height == 168 + 14 and sheet.width > 4 * 200


def test_demo_clips_and_the_contact_sheet():
    from resprune.video import demo_clip
    from resprune.visualize import overlay_video

    for kind in ("pan", "cut", "still"):
        video = demo_clip(kind, frames=5, size=(112, 84))
        assert len(video.frames) == 5 and all(f.size == (112, 84) for f in video.frames)
    still_clip = demo_clip("still", frames=3)
    assert all(np.array_equal(np.asarray(still_clip.frames[0]), np.asarray(f)) for f in still_clip.frames)
    with pytest.raises(InvalidInputError, match="unknown demo clip 'zoom'"):
        demo_clip("zoom")
    model, proc = qwen()
    video = demo_clip("pan", frames=4, size=(112, 84))
    with resprune.load_pipeline("resprune-video", budget=5).attach(model, proc) as attached, torch.no_grad():
        model(**video_chat_inputs(proc, [[video]], ["What moves?"]))
    sheet = np.asarray(overlay_video(video.frames, attached.selections[0], panel=84))
    assert sheet.shape[0] == 84 + 14
    with pytest.raises(ValueError, match="not of a video"):
        image_inputs = video_chat_inputs(proc, [[still()]], ["hi"])
        with resprune.load_pipeline("resprune-video", budget=5).attach(model, proc) as attached, torch.no_grad():
            model(**image_inputs)
        overlay_video(video.frames, attached.selections[0])


def test_the_video_demo_refuses_a_backbone_without_videos(capsys):
    from resprune.cli import main

    assert main(["demo", "--video", "pan", "--model", "tiny:llava"]) == 2
    assert "runs on Qwen2.5-VL, Qwen3-VL, Qwen3.5 and LLaVA-OneVision models" in capsys.readouterr().err


def test_the_video_demo_on_llava_onevision_keeps_nothing_of_a_repeated_frame(tmp_path, capsys):
    """The cut clip is 4 copies of one photo, then 4 of another: with a budget inside the tiny
    LLM's width, ResPrune keeps tokens of the first frame of each shot only; the contact sheet
    has one panel per frame."""
    from resprune.demo import run_video_demo

    out = run_video_demo("cut", model="tiny:llava_onevision", budget=48, out=tmp_path / "ov.png", max_new_tokens=2,
                         print_fn=lambda *_: None)
    per_frame = out["per_frame"]
    assert len(per_frame) == 8 and per_frame[0] > 0 and per_frame[4] > 0
    assert per_frame[1:4] == [0, 0, 0] and per_frame[5:] == [0, 0, 0]
    assert out["selection"].k == 48
    sheet = Image.open(out["overlay"])
    assert sheet.width > 7 * sheet.height  # 8 panels side by side


# --- EVS (vLLM's efficient video sampling) ------------------------------------------------------------


def evs_transcription(embeds: torch.Tensor, thw: tuple[int, int, int], q: float) -> torch.Tensor:
    """vllm/multimodal/evs.py @ 094f117, compute_retention_mask, transcribed literally (merge 1)."""
    t, h, w = thw
    x = embeds.reshape(t, h, w, embeds.size(-1))
    per = h * w
    dissimilarity = 1 - torch.nn.functional.cosine_similarity(x[1:], x[:-1], dim=-1)
    dissimilarity = torch.cat([255 * torch.ones_like(x[:1, :, :, 0]), dissimilarity], dim=0)
    flat = dissimilarity.view(-1)
    order = torch.argsort(flat, dim=-1, descending=True, stable=True)
    keep = max(per, int(per * t * (1 - q)))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:keep]] = True
    return mask


@settings(max_examples=60, deadline=None)
@given(t=st.integers(1, 6), h=st.integers(1, 4), w=st.integers(1, 4), q=st.floats(0.0, 0.95),
       repeat=st.booleans(), seed=st.integers(0, 999))
def test_evs_keeps_what_vllm_keeps(t, h, w, q, repeat, seed):
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(t * h * w, 8, generator=gen)
    if repeat and t > 1:  # a frame that repeats the one before: exact ties, broken by index in both
        embeds[h * w: 2 * h * w] = embeds[: h * w]
    want = evs_transcription(embeds, (t, h, w), q)
    k = int(want.sum())
    video = encoded_video(t, h, w)
    video.features = embeds
    sel = select(resprune.load_pipeline("evs", budget=k), video)
    assert sel.kept.tolist() == want.nonzero().squeeze(1).tolist()


def test_evs_on_a_cut_keeps_the_first_frame_and_the_cut():
    from resprune.video import demo_clip

    model, proc = qwen()
    video = demo_clip("cut", frames=8)  # frame pairs: A, A, B, B
    with resprune.load_pipeline("evs", budget=96).attach(model, proc) as attached, torch.no_grad():
        model(**video_chat_inputs(proc, [[video]], ["What changes?"]))
    (sel,) = attached.selections
    per_pair = torch.bincount(sel.kept // 48, minlength=4).tolist()
    assert per_pair == [48, 0, 48, 0]  # the first frame, then the cut; the repeats score 0
    with pytest.raises(resprune.MissingContextError, match="temporal_change.*needs context 'frames'"), \
            torch.no_grad():
        with resprune.load_pipeline("evs", budget=8).attach(model, proc):
            model(**video_chat_inputs(proc, [[still()]], ["hi"]))


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 6), rows=st.integers(1, 4), cols=st.integers(1, 4), per_frame=st.integers(1, 20),
       allocation=st.sampled_from(["global", "uniform"]))
def test_a_budget_per_frame_keeps_that_many_tokens_of_every_frame_pair(t, rows, cols, per_frame, allocation):
    video = encoded_video(t, rows, cols)
    pipe = resprune.Pipeline("residual_energy", budget=per_frame, video_allocation=allocation,
                             video_budget_per="frame")
    sel = select(pipe, video)
    assert sel.k == min(video.n, per_frame * t)
    if allocation == "uniform":  # every frame pair its budget (or all of its tokens)
        assert torch.bincount(video.frames[sel.kept], minlength=t).tolist() == [min(per_frame, rows * cols)] * t
    ratio = resprune.Pipeline("residual_energy", budget=0.5, video_budget_per="frame")
    assert select(ratio, video).k == resprune.resolve_budget(0.5, video.n)  # a ratio is the same share either way


def test_budget_per_frame_on_the_model_and_in_the_config():
    model, proc = qwen()
    cfg = resprune.load_config("resprune-video", ["budget=5", "video.budget_per=frame", "video.allocation=uniform"])
    inputs = video_chat_inputs(proc, [[clip(6)]], ["What moves?"])  # 3 frame pairs of 12 tokens
    with resprune.Pipeline.from_config(cfg).attach(model, proc) as attached, torch.no_grad():
        model(**inputs)
    (sel,) = attached.selections
    assert sel.k == 15 and torch.bincount(sel.kept // 12, minlength=3).tolist() == [5, 5, 5]
    with pytest.raises(resprune.ConfigError, match="video.budget_per='frames'.*Did you mean 'frame'"):
        resprune.load_config("resprune-video", ["video.budget_per=frames"])


def test_visualize_writes_a_contact_sheet_of_a_clip_or_a_folder_of_frames(tmp_path, capsys):
    from resprune.cli import main

    frames = tmp_path / "frames"
    frames.mkdir()
    for i, f in enumerate(clip(4).frames):
        f.save(frames / f"{i:03d}.png")
    (frames / "notes.txt").write_text("not a frame")
    for spec, pairs in (("cut", 4), (str(frames), 2)):
        out = tmp_path / "sheet.png"
        assert main(["visualize", "resprune-video", "--model", "tiny:qwen2_5_vl", "--video", spec, "--out",
                     str(out)]) == 0
        assert f"{pairs} frame pairs" in capsys.readouterr().out and Image.open(out).width > pairs * 50
    (tmp_path / "empty").mkdir()
    for spec, message in ((str(frames / "000.png"), "is a file but not a video"),
                          (str(tmp_path / "none"), "neither a demo clip"),
                          (str(tmp_path / "empty"), "holds no frames")):
        assert main(["visualize", "resprune-video", "--model", "tiny:qwen2_5_vl", "--video", spec]) == 2
        assert message in capsys.readouterr().err


def test_the_command_line_offers_every_demo_clip():
    from resprune import cli, video

    assert cli.DEMO_CLIPS == video.DEMO_CLIPS  # cli keeps its own copy so that --help does not import torch


@pytest.mark.parametrize("kind", ["pan", "cut"])
def test_evs_on_the_bundled_photo_clips_keeps_what_vllm_keeps(kind):
    """The tiny model's own video features of a clip built from the bundled photos."""
    from resprune.video import demo_clip

    model, proc = qwen()
    inputs = video_chat_inputs(proc, [[demo_clip(kind, frames=8)]], ["What happens?"])
    with resprune.load_pipeline("evs").attach(model, proc) as attached, torch.no_grad():
        (video,) = attached.injector.encode(model, inputs, frozenset())  # the features the LLM would get
    t, (rows, cols) = video.layout["temporal"], video.layout["grid"]
    for q in (0.5, 0.75, 0.9):
        want = evs_transcription(video.features.float(), (t, rows, cols), q)
        with resprune.load_pipeline("evs", budget=int(want.sum())).attach(model, proc) as attached, torch.no_grad():
            model(**inputs)
        assert attached.selections[0].kept.tolist() == want.nonzero().squeeze(1).tolist()


# --- LLaVA-OneVision: pooled frames and one newline per video, plain 1-D positions ---------------------


@functools.cache
def onevision():
    return load_model("tiny:llava_onevision")


ONEVISION_BATCHES = {
    "one video": ([[clip(4)]], ["What happens in the video?"]),
    "video and image in one prompt": ([[still(), clip(4)]], ["Compare the picture and the video."]),
    "two prompts, padded": ([[clip(4)], [still(), still("chelsea"), clip(4, "chelsea")]],
                            ["What moves?", "Describe all three, please."]),
    "a video and a text-only row": ([[clip(4)], []], ["What moves?", "Say hello."]),
}


def onevision_inputs(case: str):
    media, prompts = ONEVISION_BATCHES[case]
    return video_chat_inputs(onevision()[1], media, prompts)


def test_onevision_frames_are_resized_and_normalised_as_its_video_processor_does():
    from resprune.video import onevision_video_inputs

    _, proc = onevision()
    ip = proc.image_processor
    packed = onevision_video_inputs([clip(3), clip(3, "chelsea")], proc)["pixel_values_videos"]
    assert packed.shape == (2, 3, 3, ip.size["height"], ip.size["width"])
    frame = np.asarray(clip(3).frames[1].resize((ip.size["width"], ip.size["height"]), Image.BICUBIC), np.float32)
    expected = (torch.from_numpy(frame) / 255.0 - torch.tensor(ip.image_mean)) / torch.tensor(ip.image_std)
    torch.testing.assert_close(packed[0, 1], expected.permute(2, 0, 1), rtol=0, atol=1e-6)
    with pytest.raises(InvalidInputError, match="one frame count"):
        onevision_video_inputs([clip(3), clip(4)], proc)


@pytest.mark.parametrize("case", sorted(ONEVISION_BATCHES))
def test_onevision_keep_all_is_bit_identical(case):
    model, proc = onevision()
    inputs = onevision_inputs(case)
    videos = assert_keep_all_is_identical(model, proc, inputs, "resprune-llava-onevision")
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert [s.n for s in videos] == [t * (-(-side // 2)) ** 2 + 1 for t in
                                     [v.shape[0] for v in inputs["pixel_values_videos"]]]


def onevision_masked_reference(model, inputs, attached, call: str) -> dict:
    """The unpruned inputs with every dropped image or video token masked out; the pruned forward
    numbers its kept tokens 0..L'-1 (LLaVA's 1-D positions), generate lets the mask number them."""
    ref = masked_out_dropped(model, inputs, attached)
    if call == "forward":
        ref["position_ids"] = pruned_forward_positions(attached.last.columns, inputs["input_ids"])
    return ref


@pytest.mark.parametrize("case", sorted(ONEVISION_BATCHES))
@pytest.mark.parametrize("config", ["resprune-llava-onevision", "divprune", "evs"])
def test_onevision_pruned_videos_equal_the_masked_unpruned_model(case, config):
    if config == "evs" and any(isinstance(m, Image.Image) for items in ONEVISION_BATCHES[case][0] for m in items):
        pytest.skip("EVS scores videos only (an image has no frames: a named MissingContextError)")
    assert_pruned_equals_masked(*onevision(), onevision_inputs(case), config, onevision_masked_reference)


@pytest.mark.parametrize("policy", ["candidate", "keep", "drop"])
def test_onevision_video_newline_follows_the_newline_policy(policy):
    model, proc = onevision()
    inputs = onevision_inputs("one video")
    pipe = resprune.load_pipeline("resprune-llava-onevision", budget=3,
                                  overrides=[f"backbone.params.image_newline={policy}"])
    with pipe.attach(model, proc) as attached, torch.no_grad():
        model(**inputs)
    (video,) = attached.selections
    newline = video.n - 1
    assert video.geometry.layout["newline"][newline] and int(video.geometry.frames[newline]) == 3
    assert video.k == 3
    if policy == "keep":
        assert newline in video.kept.tolist()
    if policy == "drop":
        assert newline not in video.kept.tolist()


def test_onevision_uniform_allocation_counts_its_pooled_frames():
    model, proc = onevision()
    inputs = onevision_inputs("one video")
    pipe = resprune.load_pipeline("resprune-llava-onevision", budget=8, overrides=["video.allocation=uniform",
                                                                                   "backbone.params.image_newline=drop"])
    with pipe.attach(model, proc) as attached, torch.no_grad():
        model(**inputs)
    (video,) = attached.selections
    assert torch.bincount(video.geometry.frames[video.kept], minlength=4).tolist() == [2, 2, 2, 2]


def test_evs_scores_the_onevision_newline_like_the_first_frame():
    """The newline after a OneVision video has no place in the frame grid: it scores 255 like the
    first frame's tokens; the grid's tokens score as on Qwen."""
    from resprune.context import PruneContext
    from resprune.strategies.temporal import FIRST_FRAME, TemporalChange

    gen = torch.Generator().manual_seed(0)
    t, per, d = 3, 4, 8
    tokens = torch.randn(1, t * per + 1, d, generator=gen)
    frames = torch.cat([torch.arange(t).repeat_interleave(per), torch.tensor([t - 1])])
    score = TemporalChange().score(PruneContext(tokens=tokens, frames=frames))[0]
    grid = TemporalChange().score(PruneContext(tokens=tokens[:, :-1], frames=frames[:-1]))[0]
    assert float(score[-1]) == FIRST_FRAME and torch.equal(score[:-1], grid)
    with pytest.raises(InvalidInputError, match="frame by frame"):  # a token of an earlier frame after the grid
        TemporalChange().score(PruneContext(tokens=tokens, frames=torch.cat([frames[:-1], torch.tensor([0])])))


# --- energy allocation -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(k=st.integers(0, 300), parts=st.lists(st.tuples(st.floats(0, 1e6, allow_nan=False), st.integers(0, 40)),
                                             min_size=1, max_size=12))
def test_proportional_shares_add_up_exactly_within_caps(k, parts):
    from resprune.image_selection import proportional_shares

    weights, caps = [w for w, _ in parts], [c for _, c in parts]
    share = proportional_shares(k, weights, caps)
    assert sum(share) == min(k, sum(caps))
    assert all(0 <= s <= c for s, c in zip(share, caps))
    for i in range(len(caps)):  # more weight, same cap: never a smaller share
        for j in range(len(caps)):
            if weights[i] > weights[j] and caps[i] == caps[j]:
                assert share[i] >= share[j]
    if sum(c for w, c in parts if w > 0) >= k:  # enough room where there is weight: none goes where there is none
        assert all(s == 0 for s, w in zip(share, weights) if w == 0)


@settings(max_examples=30, deadline=None)
@given(t=st.integers(1, 5), per=st.integers(1, 6), d=st.integers(1, 12), seed=st.integers(0, 999),
       repeat=st.booleans())
def test_frame_residual_energy_is_the_energy_outside_the_previous_frames_span(t, per, d, seed, repeat):
    """Against float64 least squares, frame by frame."""
    from resprune.image_selection import frame_residual_energy

    gen = torch.Generator().manual_seed(seed)
    frames = [torch.randn(per, d, generator=gen, dtype=torch.float64) for _ in range(t)]
    if repeat and t > 1:
        frames[1] = frames[0].clone()  # an exact repeat: nothing outside the span
    x = torch.cat(frames)
    got = frame_residual_energy(x.float(), torch.arange(t).repeat_interleave(per)).double()
    expected = [frames[0].pow(2).sum(-1)]
    for prev, cur in zip(frames, frames[1:]):
        coef = torch.linalg.lstsq(prev.T, cur.T, driver="gelsd").solution  # cur ~ coef^T prev
        expected.append((cur - coef.T @ prev).pow(2).sum(-1))
    expected = torch.cat(expected)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * float(x.pow(2).sum(-1).max()))


def test_energy_allocation_gives_a_repeated_frame_nothing_and_a_cut_its_share():
    """Frames A, A, B, B of random tokens in a wide space: the repeats explain nothing new, so the
    budget goes to the first frame and the cut, in proportion to their energy, and adds up."""
    from resprune.image_selection import EncodedImage

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 64, generator=gen), 2 * torch.randn(6, 64, generator=gen)
    video = EncodedImage(torch.cat([a, a, b, b]), frames=torch.arange(4).repeat_interleave(6),
                         layout={"kind": "video", "grid": (2, 3), "temporal": 4})
    sel = select(resprune.Pipeline("residual_energy", budget=10, video_allocation="energy"), video)
    per_frame = torch.bincount(video.frames[sel.kept], minlength=4).tolist()
    assert per_frame[1] == per_frame[3] == 0 and sum(per_frame) == 10
    assert per_frame[2] > per_frame[0]  # the cut's tokens carry 4x the energy (1 - 6/64 of it outside A)
    with pytest.raises(resprune.ConfigError, match="energy"):
        resprune.Pipeline("residual_energy", budget=10, video_allocation="energetic")


# --- DyCoke (temporal token merging) -------------------------------------------------------------------


def dycoke_transcription(image_feature: torch.Tensor, num_tokens_per_frame: int, merging_ratio: float) -> torch.Tensor:
    """KD-TAO/DyCoke @ dd74634, llava/model/llava_arch.py, dycole_ttm, transcribed literally."""
    num_frames = image_feature.shape[0] // num_tokens_per_frame
    merging_ratio = 1 - merging_ratio
    similarities = []
    for i in range(0, num_frames - 1, 2):
        frame1_tokens = image_feature[i * num_tokens_per_frame: (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 1) * num_tokens_per_frame: (i + 2) * num_tokens_per_frame]
        frame1_norm = torch.nn.functional.normalize(frame1_tokens, p=2, dim=1)
        frame2_norm = torch.nn.functional.normalize(frame2_tokens, p=2, dim=1)
        similarities.append(torch.nn.functional.cosine_similarity(frame1_norm, frame2_norm, dim=1))
    similarities = torch.stack(similarities)
    modified_image_feature = []
    for i in range(0, num_frames - 1, 2):
        frame1_tokens = image_feature[i * num_tokens_per_frame: (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 1) * num_tokens_per_frame: (i + 2) * num_tokens_per_frame]
        avg_similarity = similarities[i // 2]
        num_tokens_to_keep = int(merging_ratio * num_tokens_per_frame)
        tokens_to_keep = avg_similarity.topk(num_tokens_to_keep, largest=False).indices
        modified_image_feature.append(frame1_tokens)
        modified_image_feature.append(frame2_tokens[tokens_to_keep])
    odd_similarities = []
    for i in range(0, num_frames - 4, 4):
        frame1_tokens = image_feature[i * num_tokens_per_frame: (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 2) * num_tokens_per_frame: (i + 3) * num_tokens_per_frame]
        odd_similarities.append(torch.nn.functional.cosine_similarity(frame1_tokens, frame2_tokens, dim=1))
    if odd_similarities:  # the official torch.stack of an empty list raises below 5 frames
        odd_similarities = torch.stack(odd_similarities)
    for i in range(0, num_frames - 4, 4):
        frame2_tokens = image_feature[(i + 2) * num_tokens_per_frame: (i + 3) * num_tokens_per_frame]
        avg_similarity = odd_similarities[i // 4]
        num_tokens_to_keep = int(merging_ratio * num_tokens_per_frame)
        tokens_to_keep = avg_similarity.topk(num_tokens_to_keep, largest=False).indices
        modified_image_feature[i + 2] = frame2_tokens[tokens_to_keep]
    return torch.cat(modified_image_feature, dim=0)


@settings(max_examples=40, deadline=None)
@given(t=st.sampled_from([2, 4, 6, 8, 10, 16]), per=st.integers(1, 12), d=st.integers(2, 16),
       k=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9]), seed=st.integers(0, 999))
def test_dycoke_keeps_what_the_official_ttm_keeps(t, per, d, k, seed):
    """The same kept tokens as the official function on random clips (its output rows matched back
    to the input's), and DyCoke's count through a pipeline at budget 1.0."""
    from resprune.strategies.dycoke import dycoke_order

    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(t * per, d, generator=gen)
    theirs = dycoke_transcription(feats, per, k)
    rows = [int(torch.nonzero((feats == row).all(-1)).squeeze()) for row in theirs]
    frames = torch.arange(t).repeat_interleave(per)
    order, count = dycoke_order(feats[None], frames, k)
    assert count == len(rows) and sorted(order[0, :count].tolist()) == sorted(rows)
    video = encoded_video(t, 1, per, d=d)
    video.features = feats
    sel = select(resprune.load_pipeline("dycoke", ["selector.params.merging_ratio=" + str(k)]), video)
    assert sel.kept.tolist() == sorted(rows)


def test_dycoke_under_a_smaller_budget_keeps_whole_frames_first_and_keeps_the_onevision_newline():
    from resprune.strategies.dycoke import dycoke_order

    gen = torch.Generator().manual_seed(1)
    t, per = 4, 6
    feats = torch.randn(t * per + 1, 8, generator=gen)  # a OneVision video: a newline after the grid
    frames = torch.cat([torch.arange(t).repeat_interleave(per), torch.tensor([t - 1])])
    order, count = dycoke_order(feats[None], frames, 0.5)
    assert count == 1 + 2 * per + 2 * 3  # the newline, frames 0 and 2 whole, half of frames 1 and 3
    assert order[0, 0] == t * per and sorted(order[0, 1:1 + 2 * per].tolist()) == list(range(per)) + list(
        range(2 * per, 3 * per))
    assert sorted(order[0].tolist()) == list(range(t * per + 1))  # every token once: DyCoke's, then the dropped
    with pytest.raises(InvalidInputError, match="frame by frame"):
        dycoke_order(feats[None], torch.cat([frames[:-1], torch.tensor([0])]), 0.5)


def test_dycoke_on_llava_onevision_keeps_its_count_and_equals_the_masked_model():
    model, proc = onevision()
    inputs = onevision_inputs("one video")
    with resprune.load_pipeline("dycoke").attach(model, proc) as attached, torch.no_grad():
        logits = model(**inputs).logits
        fwd_ref = onevision_masked_reference(model, inputs, attached, "forward")
    with torch.no_grad():
        ref_logits = model(**fwd_ref).logits
    (video,) = attached.selections
    per = 14 * 14
    assert video.k == 1 + per * 2 + int(0.3 * per) * 2  # 4 frames: 0 and 2 whole (no second pass below 5)
    cols = attached.last.columns
    valid = cols[0] >= 0
    torch.testing.assert_close(logits[0, valid], ref_logits[0, cols[0][valid]], rtol=0, atol=1e-5)


# --- video files (PyAV) --------------------------------------------------------------------------------


def write_mp4(path, frames, fps: int = 4) -> None:
    av = pytest.importorskip("av", reason="writing a test video needs PyAV")
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_image(f)))
        out.mux(stream.encode())


def test_a_video_file_is_read_with_frames_spread_evenly_over_it(tmp_path):
    """Twelve frames, each a flat grey a step lighter: sampling 4 keeps frames 0, 4, 7 and 11 (lmms-eval's
    linspace), in order, and the sampled rate over the 3 s clip."""
    from resprune.video import load_video, read_video_file

    frames = [Image.new("RGB", (64, 48), (20 * i, 20 * i, 20 * i)) for i in range(12)]
    path = tmp_path / "ramp.mp4"
    write_mp4(path, frames, fps=4)
    video = read_video_file(path, max_frames=4)
    grey = [float(np.asarray(f, dtype=np.float32).mean()) for f in video.frames]
    assert len(video.frames) == 4 and video.frames[0].size == (64, 48)
    assert [round(g / 20) for g in grey] == [0, 4, 7, 11]  # lossy codec: within a grey step
    assert video.fps == pytest.approx(4 / 3, rel=0.05)
    assert len(load_video(str(path), max_frames=32).frames) == 12  # fewer than asked: every frame
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(InvalidInputError, match="could not be decoded"):
        read_video_file(tmp_path / "broken.mp4")
    with pytest.raises(InvalidInputError, match="max_frames must be a positive int"):
        read_video_file(path, max_frames=0)


def test_render_media_chats_checks_the_parts_against_the_media():
    from resprune.video import render_media_chats

    _, proc = qwen()
    chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(InvalidInputError, match="do not match the media given"):
        render_media_chats(proc, [chat], [still()])
    system = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, *chat]
    batch = render_media_chats(proc, [system], [clip(4)])
    plain = video_chat_inputs(proc, [[clip(4)]], ["hi"])
    assert batch["input_ids"].shape[1] > plain["input_ids"].shape[1]  # the system turn, the same video tokens
    assert int((batch["input_ids"] == proc.video_token_id).sum()) == int((plain["input_ids"] == proc.video_token_id).sum())


def test_resprune_run_on_a_video_file_prints_each_frames_share_and_writes_a_contact_sheet(tmp_path, capsys):
    from resprune.cli import main
    from resprune.data import video_path

    out = tmp_path / "run.png"
    assert main(["run", "resprune-llava-onevision", "budget=48", "--model", "tiny:llava_onevision", "--video",
                 str(video_path("cut")), "--prompt", "What changes?", "--max-new-tokens", "2", "--out", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    (kept,) = summary["kept"]
    assert kept["kept"] == 48 and kept["image_tokens"] == 8 * 14 * 14 + 1
    assert len(kept["per_frame"]) == 8 and sum(kept["per_frame"]) <= 48  # the newline is no frame's cell
    assert Image.open(out).width > 7 * Image.open(out).height
    assert main(["run", "resprune-llava15", "--model", "tiny:llava", "--video", "cut", "--prompt", "hi"]) == 2
    assert "runs on Qwen2.5-VL, Qwen3-VL, Qwen3.5 and LLaVA-OneVision models" in capsys.readouterr().err


# --- the temporal merger -------------------------------------------------------------------------------


def temporal_merge_reference(tokens, kept, t, per, min_similarity=-1.0):
    """Token by token: a dropped token of frame f at place p joins the kept token at p in the latest
    frame before f that kept p, else the earliest after it; each kept token becomes the mean of
    itself and its members."""
    kept = set(kept)
    groups = {k: [k] for k in kept}
    for i in range(t * per):
        if i in kept:
            continue
        f, p = divmod(i, per)
        before = [g for g in range(f - 1, -1, -1) if g * per + p in kept]
        after = [g for g in range(f + 1, t) if g * per + p in kept]
        target = (before or after or [None])[0]
        if target is None:
            continue
        j = target * per + p
        if float(torch.nn.functional.cosine_similarity(tokens[i], tokens[j], dim=0)) >= min_similarity:
            groups[j].append(i)
    return {k: tokens[v].mean(0) for k, v in groups.items()}


@settings(max_examples=60, deadline=None)
@given(t=st.integers(1, 6), per=st.integers(1, 6), newline=st.booleans(), k=st.integers(1, 40),
       threshold=st.sampled_from([-1.0, 0.0, 0.3]), seed=st.integers(0, 999))
def test_the_temporal_merger_averages_each_dropped_token_into_its_places_nearest_kept_copy(t, per, newline, k,
                                                                                           threshold, seed):
    from resprune.context import PruneContext
    from resprune.strategies.temporal import TemporalMerge

    gen = torch.Generator().manual_seed(seed)
    n = t * per + int(newline)
    tokens = torch.randn(n, 6, generator=gen)
    frames = torch.cat([torch.arange(t).repeat_interleave(per), torch.full((int(newline),), t - 1)])
    kept = torch.randperm(n, generator=gen)[: min(k, n)].sort().values
    merger = TemporalMerge({"min_similarity": threshold})
    idx, feats = merger.merge(tokens[None], kept[None], 0, {}, PruneContext(tokens[None], frames=frames))
    assert torch.equal(idx[0], kept)
    expected = temporal_merge_reference(tokens, kept.tolist(), t, per, threshold)
    for j, f in zip(kept.tolist(), feats[0]):
        torch.testing.assert_close(f, expected[j], rtol=1e-5, atol=1e-6)


def test_the_temporal_merger_in_a_pipeline_on_a_static_clip_changes_nothing():
    """Frames that repeat one frame: every merged token is the mean of copies of itself."""
    video = encoded_video(4, 2, 3)
    video.features = video.features[:6].repeat(4, 1)
    plain = select(resprune.Pipeline("residual_energy", budget=6), video)
    merged = select(resprune.Pipeline("residual_energy", budget=6, merger="temporal"), video)
    assert torch.equal(plain.kept, merged.kept)
    torch.testing.assert_close(merged.features, video.features[merged.kept], rtol=0, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(t=st.integers(2, 6), per=st.integers(1, 8), d=st.integers(2, 12), static=st.floats(0.1, 0.9),
       seed=st.integers(0, 999))
def test_evs_never_keeps_a_static_patch_twice(t, per, d, static, seed):
    """A place that repeats the previous frame exactly is a static patch: with a budget of the
    first frame and every changed token, EVS keeps none of its repeats (one copy, the first)."""
    gen = torch.Generator().manual_seed(seed)
    frames = [torch.randn(per, d, generator=gen)]
    for _ in range(t - 1):
        nxt = torch.randn(per, d, generator=gen)
        keep = torch.rand(per, generator=gen) < static
        frames.append(torch.where(keep[:, None], frames[-1], nxt))
    tokens = torch.cat(frames)
    repeats = [f * per + p for f in range(1, t) for p in range(per) if torch.equal(frames[f][p], frames[f - 1][p])]
    k = t * per - len(repeats)
    video = encoded_video(t, 1, per, d=d)
    video.features = tokens
    sel = select(resprune.load_pipeline("evs", budget=k), video)
    assert not set(sel.kept.tolist()) & set(repeats)


# --- a budget as an energy fraction --------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), d=st.integers(1, 12), rank=st.integers(1, 12), f=st.floats(0.05, 0.95),
       seed=st.integers(0, 999))
def test_an_energy_fraction_keeps_the_fewest_greedy_picks_that_hold_it(n, d, rank, f, seed):
    """The count is the first step at which the greedy picks' span holds the fraction f of the
    tokens' energy (float64, within float32 rounding of the boundary)."""
    from resprune.linalg import greedy_residual_select, span_residual

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(1, n, min(rank, d), generator=gen) @ torch.randn(min(rank, d), d, generator=gen)
    counts: list[int] = []
    picks = greedy_residual_select(tokens, n, until_fraction=f, counts=counts)
    t = counts[0]
    assert picks.shape == (1, t) and 1 <= t <= n
    total = span_residual(tokens[0], [])
    slack = 1e-4 * total
    assert span_residual(tokens[0], picks[0, :t].tolist()) <= (1 - f) * total + slack
    if t > 1:
        assert span_residual(tokens[0], picks[0, : t - 1].tolist()) >= (1 - f) * total - slack
    full = greedy_residual_select(tokens, n)  # the same greedy sequence, cut at t
    assert torch.equal(full[0, :t], picks[0])


def test_a_video_budget_as_an_energy_fraction_through_a_pipeline():
    """``selector.params.energy_fraction`` with a budget of 1.0 as the cap: a static clip needs its
    first frame's span only; the budget still caps the count."""
    video = encoded_video(4, 2, 3, d=32)
    video.features = video.features[:6].repeat(4, 1)  # 4 copies of one frame of 6 tokens
    selector = resprune.get_host().selectors.get("residual_energy")
    sel = select(resprune.Pipeline(selector({"energy_fraction": 0.99}), budget=1.0), video)
    assert 1 <= sel.k <= 6 and bool((video.frames[sel.kept] == 0).all())
    capped = select(resprune.Pipeline(selector({"energy_fraction": 0.99}), budget=2), video)
    plain = select(resprune.Pipeline(selector(), budget=2), video)
    assert capped.k == 2 and torch.equal(capped.kept, plain.kept)
    with pytest.raises(resprune.ConfigError, match="energy_fraction must be below 1"):
        resprune.load_pipeline("resprune-video", ["selector.params.energy_fraction=1.0"])


# --- Qwen3-VL: a timestamp before each temporal patch, DeepStack features on video tokens ------------


@functools.cache
def qwen3():
    return load_model("tiny:qwen3_vl")


def qwen3_inputs(case: str):
    media, prompts = BATCHES[case]
    return video_chat_inputs(qwen3()[1], media, prompts)


def test_qwen3_vl_video_prompt_is_what_its_processor_writes():
    """Each temporal patch written as its time and its tokens, as Qwen3VLProcessor.replace_video_token
    writes them for the same frames (its timestamps: the mean of each patch's frame times)."""
    from transformers.video_utils import VideoMetadata

    _, proc = qwen3()
    video = clip(5)
    inputs = video_chat_inputs(proc, [[video]], ["What happens?"])
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert t == 3 and "second_per_grid_ts" not in inputs
    metadata = VideoMetadata(total_num_frames=6, fps=video.fps, frames_indices=list(range(6)))
    expected = proc.replace_video_token({"video_grid_thw": inputs["video_grid_thw"], "video_metadata": [metadata]}, 0)
    text = proc.tokenizer.decode(inputs["input_ids"][0])
    assert expected in text and expected.count("seconds>") == 3 and "<0.2 seconds>" in expected
    assert int((inputs["input_ids"] == qwen3()[0].config.video_token_id).sum()) == t * h * w // 4


@pytest.mark.parametrize("case", sorted(BATCHES))
def test_qwen3_vl_keep_all_on_videos_is_bit_identical(case):
    inputs = qwen3_inputs(case)
    selections = assert_keep_all_is_identical(*qwen3(), inputs, "resprune-qwen3-vl")
    assert sorted(s.n for s in selections) == sorted(t * h * w // 4 for t, h, w in inputs["video_grid_thw"].tolist())


@pytest.mark.parametrize("case", sorted(BATCHES))
@pytest.mark.parametrize("config", ["resprune-qwen3-vl", "divprune"])
def test_qwen3_vl_pruned_videos_equal_the_masked_unpruned_model(case, config):
    """A video's timestamped patches are one video for the selection; its kept tokens keep their
    time, row and column positions and their DeepStack features."""
    assert_pruned_equals_masked(*qwen3(), qwen3_inputs(case), config, masked_reference)


@pytest.mark.parametrize("case", sorted(BATCHES))
def test_qwen3_5_videos_keep_all_and_pruned_equal_the_pruned_prompt_run_by_hand(case):
    """Qwen3.5 (Gated DeltaNet layers cannot mask): keep-all is the model; pruned, generate equals
    its LLM run by hand without a cache on the prompt holding only the kept image and video tokens."""
    from types import SimpleNamespace

    from test_llm_stages import greedy, hybrid_reference, keep_masks

    model, proc = load_model("tiny:qwen3_5")
    media, prompts = BATCHES[case]
    inputs = video_chat_inputs(proc, media, prompts)
    assert_keep_all_is_identical(model, proc, inputs, "resprune-qwen3.5")
    with resprune.load_pipeline("resprune-qwen3.5", budget=0.3).attach(model, proc) as attached, torch.no_grad():
        out = greedy(model, inputs)
    assert any(s.geometry.layout["kind"] == "video" and s.k < s.n for s in attached.selections)
    with torch.no_grad():
        ids, logits = hybrid_reference(model, inputs, keep_masks(model, inputs, [SimpleNamespace(
            layer=0, selections=attached.selections)]), 4)
    assert torch.equal(out.sequences, ids)
    for a, b in zip(out.logits, logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
