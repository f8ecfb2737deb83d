"""Videos as model inputs, built without torchvision.

Transformers' video processors import torchvision, whose registry wheels do not load next to
the CPU torch this project runs on. ``qwen_video_inputs`` packs frames the way
``Qwen2VLVideoProcessor`` does:
- resize every frame to the size ``smart_resize`` gives, a multiple of ``patch * merge``;
- rescale and normalise with the image processor's mean and std;
- repeat the last frame up to a multiple of the temporal patch (2 frames);
- cut the clip into ``[grid_t * grid_h * grid_w, C * 2 * patch * patch]`` rows, in the
  processor's order (2x2 merge groups together).

Where torchvision imports, the real video processor can be used instead. The frames are
resized with PIL's bicubic filter, which can differ by a grey level from torchvision's.

``onevision_video_inputs`` packs frames the way ``LlavaOnevisionVideoProcessor`` does: every
frame resized to the image processor's tile size, rescaled and normalised, stacked as
``[videos, frames, C, H, W]``.

``video_chat_inputs`` renders one chat per prompt whose user turn holds images and videos in
the order given. It expands each video's placeholder to its token count and returns the batch
the model takes: for Qwen2.5-VL ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, the
image inputs, ``pixel_values_videos``, ``video_grid_thw`` and ``second_per_grid_ts``; for
LLaVA-OneVision ``input_ids``, ``attention_mask``, the image inputs and ``pixel_values_videos``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import InvalidInputError

__all__ = ["Video", "demo_clip", "DEMO_CLIPS", "frame_counts", "load_video", "onevision_video_inputs", "VIDEO_MODEL_TYPES",
           "qwen_video_inputs", "require_videos", "video_chat_inputs"]


@dataclass
class Video:
    """A clip: its frames (PIL images of one size, in time order) and the rate they were sampled at."""

    frames: list[Image.Image]
    fps: float = 2.0

    def __post_init__(self) -> None:
        if not self.frames:
            raise InvalidInputError("a video needs at least one frame.")
        sizes = {f.size for f in self.frames}
        if len(sizes) > 1:
            raise InvalidInputError(f"every frame of a video must have one size, got {sorted(sizes)}.")
        if not self.fps > 0:
            raise InvalidInputError(f"a video's fps must be > 0, got {self.fps!r}.")


DEMO_CLIPS = ("pan", "cut", "still")
"""The clips ``demo_clip`` builds from the bundled photos."""


def demo_clip(kind: str = "pan", frames: int = 8, size: tuple[int, int] = (224, 168), fps: float = 2.0) -> Video:
    """A short clip built offline from the bundled photos: ``pan`` (a slow pan and zoom across the
    astronaut photo), ``cut`` (the coffee photo, then a hard cut to the rocket half-way) or
    ``still`` (one photo held: every frame the same). ``size`` is (width, height)."""
    from .data import photo_path

    if kind not in DEMO_CLIPS:
        raise InvalidInputError(f"unknown demo clip '{kind}': one of {', '.join(DEMO_CLIPS)}.")
    if frames < 1:
        raise InvalidInputError(f"a demo clip needs at least one frame, got {frames}.")
    aspect = size[0] / size[1]

    def view(photo: Image.Image, x: float, zoom: float) -> Image.Image:
        h = photo.height / zoom
        w = min(photo.width, h * aspect)
        left = x * (photo.width - w)
        top = (photo.height - h) / 2
        return photo.crop((round(left), round(top), round(left + w), round(top + h))).resize(size, Image.BICUBIC)

    first = Image.open(photo_path("astronaut" if kind == "pan" else "coffee")).convert("RGB")
    second = Image.open(photo_path("rocket")).convert("RGB")
    out = []
    for i in range(frames):
        f = i / max(frames - 1, 1)
        if kind == "pan":
            out.append(view(first, f, 1.0 + 0.3 * f))
        elif kind == "cut":
            out.append(view(first if i < frames // 2 else second, 0.5, 1.0))
        else:
            out.append(view(first, 0.5, 1.0))
    return Video(out, fps=fps)


FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_video(spec: str, fps: float = 2.0) -> Video:
    """A video from ``spec``: a demo clip name (``DEMO_CLIPS``), or a folder of frame images (one
    size; in file-name order) sampled at ``fps``."""
    from pathlib import Path

    if spec in DEMO_CLIPS:
        return demo_clip(spec, fps=fps)
    folder = Path(spec)
    if folder.is_file():
        raise InvalidInputError(f"video '{spec}' is a file: resprune reads a video as a folder of its frames. "
                                f"Extract them first, e.g. ffmpeg -i {folder.name} -vf fps={fps:g} frames/%04d.png, "
                                f"then pass the folder.")
    if not folder.is_dir():
        raise InvalidInputError(f"video '{spec}' is neither a demo clip ({', '.join(DEMO_CLIPS)}) nor a folder of "
                                f"frames.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file())
    if not files:
        raise InvalidInputError(f"video folder '{spec}' holds no frames ({', '.join(FRAME_SUFFIXES)} files).")
    frames = []
    for path in files:
        try:
            with Image.open(path) as img:
                frames.append(img.convert("RGB"))
        except OSError as exc:
            raise InvalidInputError(f"frame '{path}' is not a readable image ({exc}).") from None
    return Video(frames, fps=fps)


VIDEO_MODEL_TYPES = ("qwen2_5_vl", "llava_onevision")
"""The backbones resprune prunes videos of."""


def require_videos(model: Any, name: str, what: str) -> None:
    """``InvalidInputError`` unless ``model`` is a backbone resprune prunes videos of
    (``VIDEO_MODEL_TYPES``); ``what`` names the command or option asking (``--video``)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in VIDEO_MODEL_TYPES:
        raise InvalidInputError(f"{what} runs on Qwen2.5-VL and LLaVA-OneVision models (videos of other backbones "
                                f"are not supported yet); '{name}' is a {model_type} model.")


def frame_counts(selection: Any) -> list[int]:
    """How many tokens a video's ``ImageSelection`` kept of each frame (Qwen2.5-VL: frame pair) of
    its grid, in time order (a token after the grid, such as LLaVA-OneVision's newline, is not
    counted)."""
    layout = selection.geometry.layout
    rows, cols = layout["grid"]
    t = layout["temporal"]
    kept = selection.kept.cpu()
    return torch.bincount(kept[kept < t * rows * cols] // (rows * cols), minlength=t).tolist()


def _settings(processor: Any) -> dict[str, Any]:
    ip = getattr(processor, "image_processor", processor)
    size = getattr(ip, "size", None) or {}
    return {"patch": int(getattr(ip, "patch_size", 14)), "merge": int(getattr(ip, "merge_size", 2)),
            "temporal": int(getattr(ip, "temporal_patch_size", 2)),
            "min_pixels": int(size.get("shortest_edge", getattr(ip, "min_pixels", 56 * 56))),
            "max_pixels": int(size.get("longest_edge", getattr(ip, "max_pixels", 28 * 28 * 1280))),
            "mean": np.asarray(ip.image_mean, dtype=np.float32), "std": np.asarray(ip.image_std, dtype=np.float32)}


def qwen_video_inputs(videos: Sequence[Video], processor: Any) -> dict[str, torch.Tensor]:
    """``pixel_values_videos``, ``video_grid_thw`` and ``second_per_grid_ts`` of ``videos`` for a
    Qwen2.5-VL model whose processor (or image processor) is ``processor``."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # no torchvision

    s = _settings(processor)
    patch, merge, temporal = s["patch"], s["merge"], s["temporal"]
    rows, grids, seconds = [], [], []
    for video in videos:
        width, height = video.frames[0].size
        rh, rw = smart_resize(height, width, factor=patch * merge, min_pixels=s["min_pixels"],
                              max_pixels=s["max_pixels"])
        frames = [np.asarray(f.convert("RGB").resize((rw, rh), Image.BICUBIC), dtype=np.float32) / 255.0
                  for f in video.frames]
        clip = (np.stack(frames) - s["mean"]) / s["std"]  # [T, H, W, C]
        clip = torch.from_numpy(clip).permute(0, 3, 1, 2)  # [T, C, H, W]
        if pad := -clip.shape[0] % temporal:
            clip = torch.cat([clip, clip[-1:].expand(pad, -1, -1, -1)])
        t, c = clip.shape[0] // temporal, clip.shape[1]
        gh, gw = rh // patch, rw // patch
        patches = clip.reshape(t, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, h-groups, w-groups, merge, merge, C, temporal, p, p
        rows.append(patches.reshape(t * gh * gw, c * temporal * patch * patch))
        grids.append([t, gh, gw])
        seconds.append(temporal / video.fps)
    return {"pixel_values_videos": torch.cat(rows).float(), "video_grid_thw": torch.tensor(grids, dtype=torch.long),
            "second_per_grid_ts": torch.tensor(seconds, dtype=torch.float32)}


def onevision_video_inputs(videos: Sequence[Video], processor: Any) -> dict[str, torch.Tensor]:
    """``pixel_values_videos`` ``[videos, frames, C, H, W]`` of ``videos`` for a LLaVA-OneVision
    model whose processor (or image processor) is ``processor``: each frame resized (bicubic) to
    the tile size, rescaled and normalised. The videos of one batch need one frame count."""
    ip = getattr(processor, "image_processor", processor)
    size = getattr(ip, "size", None) or {}
    if "height" not in size or "width" not in size:
        raise InvalidInputError(f"onevision_video_inputs needs a LLaVA-OneVision image processor (size with height "
                                f"and width), got size {dict(size)!r}.")
    counts = sorted({len(v.frames) for v in videos})
    if len(counts) > 1:
        raise InvalidInputError(f"LLaVA-OneVision takes the videos of one batch as one tensor: give them one frame "
                                f"count (got {counts}; sample each to the same number of frames).")
    mean = np.asarray(ip.image_mean, dtype=np.float32)
    std = np.asarray(ip.image_std, dtype=np.float32)
    clips = []
    for video in videos:
        frames = [np.asarray(f.convert("RGB").resize((int(size["width"]), int(size["height"])), Image.BICUBIC),
                             dtype=np.float32) / 255.0 for f in video.frames]
        clips.append(torch.from_numpy((np.stack(frames) - mean) / std).permute(0, 3, 1, 2))  # [T, C, H, W]
    return {"pixel_values_videos": torch.stack(clips).float()}


def _onevision_video_tokens(processor: Any, video: torch.Tensor) -> int:
    """Placeholder tokens of one packed video: its frames' pooled grids and one newline (the
    processor's own count)."""
    side = int(math.isqrt(int(processor.num_image_tokens)))
    return video.shape[0] * (-(-side // 2)) ** 2 + 1


def video_chat_inputs(processor: Any, media: Sequence[Sequence[Image.Image | Video]], prompts: Sequence[str], *,
                      device: Any = None) -> Any:
    """A left-padded batch of one-turn chats: prompt ``i`` shows ``media[i]`` (images and
    videos, in that order), then asks ``prompts[i]``. Qwen2.5-VL and LLaVA-OneVision processors."""
    if len(media) != len(prompts):
        raise InvalidInputError(f"video_chat_inputs: {len(media)} media lists for {len(prompts)} prompts.")
    tok = getattr(processor, "tokenizer", None)
    video_token = getattr(processor, "video_token", None)
    if tok is None or video_token is None:
        raise InvalidInputError("video_chat_inputs needs a Qwen2.5-VL or LLaVA-OneVision processor (its tokenizer "
                                "and video token).")
    onevision = hasattr(processor, "num_image_tokens") and hasattr(processor, "vision_aspect_ratio")
    images = [m for items in media for m in items if isinstance(m, Image.Image)]
    videos = [m for items in media for m in items if isinstance(m, Video)]
    bad = [type(m).__name__ for items in media for m in items if not isinstance(m, (Image.Image, Video))]
    if bad:
        raise InvalidInputError(f"video_chat_inputs: media must be PIL images or resprune.video.Video, got {bad[0]}.")
    if onevision:
        packed = onevision_video_inputs(videos, processor) if videos else {}
        counts = iter([_onevision_video_tokens(processor, v) for v in packed.get("pixel_values_videos", [])])
    else:
        packed = qwen_video_inputs(videos, processor) if videos else {}
        merge = _settings(processor)["merge"]
        counts = iter([int(t * h * w) // merge**2
                       for t, h, w in packed.get("video_grid_thw", torch.zeros(0, 3)).tolist()])
    texts = []
    for items, prompt in zip(media, prompts):
        content = [{"type": "video" if isinstance(m, Video) else "image"} for m in items] + [
            {"type": "text", "text": prompt}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        pieces = text.split(video_token)
        if len(pieces) - 1 != sum(isinstance(m, Video) for m in items):
            raise InvalidInputError("video_chat_inputs: the chat template did not place one video token per video.")
        text = pieces[0] + "".join(video_token * next(counts) + rest for rest in pieces[1:])
        texts.append(text)
    old_side = getattr(tok, "padding_side", "left")
    tok.padding_side = "left"
    try:
        # LLaVA-OneVision tells one image alone in its prompt (AnyRes) from several (base tile only) by nesting
        nested = [[m for m in items if isinstance(m, Image.Image)] for items in media] if onevision else images
        batch = processor(text=texts, images=[n for n in nested if n] if images else None, return_tensors="pt",
                          padding=True)
    finally:
        tok.padding_side = old_side
    batch.update(packed)
    return batch.to(device) if device is not None else batch
