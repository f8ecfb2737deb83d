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
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import InvalidInputError

__all__ = ["Video", "demo_clip", "DEMO_CLIPS", "frame_counts", "load_video", "onevision_video_inputs", "VIDEO_MODEL_TYPES",
           "VIDEO_SUFFIXES", "qwen_video_inputs", "read_video_file", "render_media_chats", "require_videos",
           "video_chat_inputs"]


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


def read_video_file(path: str | Path, max_frames: int = 32) -> Video:
    """``max_frames`` frames of a video file spread evenly over it (the first and the last
    included; all of them if it has fewer), decoded with PyAV (``pip install av``, in the
    ``video`` and ``lmms-eval`` extras): lmms-eval's own sampling (``np.linspace`` over the
    frame indices). The clip's ``fps`` is the rate of the sampled frames over the video's
    duration."""
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise InvalidInputError(f"max_frames must be a positive int, got {max_frames!r}.")
    try:
        import av
    except ImportError:
        raise InvalidInputError(f"video '{path}': reading a video file needs PyAV: pip install av (or "
                                f"'resprune[video]'); or pass a folder of its frames.") from None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = [frame.to_image().convert("RGB") for frame in container.decode(stream)]
            duration = (float(stream.duration * stream.time_base) if stream.duration and stream.time_base
                        else None)
            rate = float(stream.average_rate) if stream.average_rate else None
    except (av.FFmpegError, IndexError, OSError) as exc:
        raise InvalidInputError(f"video '{path}' could not be decoded ({type(exc).__name__}: {exc}).") from None
    if not frames:
        raise InvalidInputError(f"video '{path}' has no frames.")
    if duration is None:
        duration = len(frames) / rate if rate else float(len(frames))
    picks = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
    sampled = [frames[i] for i in picks]
    return Video(sampled, fps=len(sampled) / duration if duration > 0 else 2.0)


VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif")


def load_video(spec: str, fps: float = 2.0, max_frames: int = 32) -> Video:
    """A video from ``spec``: a demo clip name (``DEMO_CLIPS``), a video file (``read_video_file``:
    ``max_frames`` evenly spread), or a folder of frame images (one size; in file-name order)
    sampled at ``fps``."""
    if spec in DEMO_CLIPS:
        return demo_clip(spec, fps=fps)
    folder = Path(spec)
    if folder.is_file():
        if folder.suffix.lower() not in VIDEO_SUFFIXES:
            raise InvalidInputError(f"video '{spec}' is a file but not a video ({', '.join(VIDEO_SUFFIXES)}); pass a "
                                    f"video file, a folder of frames or a demo clip ({', '.join(DEMO_CLIPS)}).")
        return read_video_file(folder, max_frames)
    if not folder.is_dir():
        raise InvalidInputError(f"video '{spec}' is neither a demo clip ({', '.join(DEMO_CLIPS)}), a video file nor a "
                                f"folder of frames.")
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


VIDEO_MODEL_TYPES = ("qwen2_5_vl", "llava_onevision", "qwen3_vl", "qwen3_5")
"""The backbones resprune prunes videos of."""


def require_videos(model: Any, name: str, what: str) -> None:
    """``InvalidInputError`` unless ``model`` is a backbone resprune prunes videos of
    (``VIDEO_MODEL_TYPES``); ``what`` names the command or option asking (``--video``)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in VIDEO_MODEL_TYPES:
        raise InvalidInputError(f"{what} runs on Qwen2.5-VL, Qwen3-VL, Qwen3.5 and LLaVA-OneVision models (videos of "
                                f"other backbones are not supported yet); '{name}' is a {model_type} model.")


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


def is_qwen3_vl_processor(processor: Any) -> bool:
    """A Qwen3-VL processor: it writes a timestamp before each temporal patch of a video."""
    return any(cls.__name__ == "Qwen3VLProcessor" for cls in type(processor).__mro__)


def qwen3_video_placeholder(processor: Any, video: Video, t: int, tokens_per_patch: int) -> str:
    """What a Qwen3-VL processor writes for a video token: per temporal patch, its time (the mean of
    its frames' times, ``<0.8 seconds>``) and its tokens between vision start and end."""
    temporal = _settings(processor)["temporal"]
    times = [(i * temporal + (temporal - 1) / 2) / video.fps for i in range(t)]
    frame = processor.vision_start_token + processor.video_token * tokens_per_patch + processor.vision_end_token
    return "".join(f"<{time:.1f} seconds>{frame}" for time in times)


def qwen_video_inputs(videos: Sequence[Video], processor: Any) -> dict[str, torch.Tensor]:
    """``pixel_values_videos``, ``video_grid_thw`` and (Qwen2.5-VL) ``second_per_grid_ts`` of
    ``videos`` for a Qwen2.5-VL or Qwen3-VL model whose processor (or image processor) is
    ``processor``."""
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
    out = {"pixel_values_videos": torch.cat(rows).float(), "video_grid_thw": torch.tensor(grids, dtype=torch.long)}
    if not is_qwen3_vl_processor(processor):  # Qwen3-VL writes timestamps into the prompt instead
        out["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
    return out


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
    videos, in that order), then asks ``prompts[i]``. Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision processors."""
    if len(media) != len(prompts):
        raise InvalidInputError(f"video_chat_inputs: {len(media)} media lists for {len(prompts)} prompts.")
    chats = [[{"role": "user", "content": [{"type": "video" if isinstance(m, Video) else "image"} for m in items]
               + [{"type": "text", "text": prompt}]}] for items, prompt in zip(media, prompts)]
    return render_media_chats(processor, chats, [m for items in media for m in items], device=device)


def render_media_chats(processor: Any, chats: Sequence[Sequence[dict[str, Any]]],
                       media: Sequence[Image.Image | Video], *, suffixes: Sequence[str] | None = None,
                       device: Any = None, dtype: Any = None) -> Any:
    """A left-padded batch of conversations with images and videos, rendered with the processor's
    chat template and the generation prompt (then ``suffixes``): ``media`` fill the chats'
    ``{"type": "image"}`` and ``{"type": "video"}`` parts in order. Each video's placeholder is
    expanded to its token count and its frames packed as the model's video processor packs them
    (no torchvision; Qwen3-VL: a timestamp before each temporal patch, as its processor writes).
    Floating tensors go to ``dtype`` if given. Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision processors."""
    tok = getattr(processor, "tokenizer", None)
    video_token = getattr(processor, "video_token", None)
    if tok is None or video_token is None:
        raise InvalidInputError("videos need a Qwen2.5-VL, Qwen3-VL or LLaVA-OneVision processor (its tokenizer "
                                "and video token).")
    bad = [type(m).__name__ for m in media if not isinstance(m, (Image.Image, Video))]
    if bad:
        raise InvalidInputError(f"video_chat_inputs: media must be PIL images or resprune.video.Video, got {bad[0]}.")
    kinds = [[part.get("type") for message in chat for part in (message.get("content") or [])
              if isinstance(part, dict) and part.get("type") in ("image", "video")] for chat in chats]
    wanted = [kind for chat in kinds for kind in chat]
    given = ["video" if isinstance(m, Video) else "image" for m in media]
    if wanted != given:
        raise InvalidInputError(f"the chats' image and video parts ({wanted}) do not match the media given "
                                f"({given}).")
    onevision = hasattr(processor, "num_image_tokens") and hasattr(processor, "vision_aspect_ratio")
    images = [m for m in media if isinstance(m, Image.Image)]
    videos = [m for m in media if isinstance(m, Video)]
    if onevision:
        packed = onevision_video_inputs(videos, processor) if videos else {}
        spans = iter([video_token * _onevision_video_tokens(processor, v)
                      for v in packed.get("pixel_values_videos", [])])
    else:
        packed = qwen_video_inputs(videos, processor) if videos else {}
        merge = _settings(processor)["merge"]
        grids = packed.get("video_grid_thw", torch.zeros(0, 3, dtype=torch.long)).tolist()
        if is_qwen3_vl_processor(processor):
            spans = iter([qwen3_video_placeholder(processor, v, t, h * w // merge**2) for v, (t, h, w) in
                          zip(videos, grids)])
        else:
            spans = iter([video_token * (t * h * w // merge**2) for t, h, w in grids])
    texts = []
    for chat, chat_kinds in zip(chats, kinds):
        text = processor.apply_chat_template(list(chat), tokenize=False, add_generation_prompt=True)
        pieces = text.split(video_token)
        if len(pieces) - 1 != chat_kinds.count("video"):
            raise InvalidInputError("the chat template did not place one video token per video.")
        texts.append(pieces[0] + "".join(next(spans) + rest for rest in pieces[1:]))
    if suffixes is not None:
        texts = [text + suffix for text, suffix in zip(texts, suffixes, strict=True)]
    old_side = getattr(tok, "padding_side", "left")
    tok.padding_side = "left"
    try:
        # LLaVA-OneVision tells one image alone in its prompt (AnyRes) from several (base tile only) by nesting
        it = iter(media)
        per_chat = [[next(it) for _ in chat_kinds] for chat_kinds in kinds]
        nested = [[m for m in items if isinstance(m, Image.Image)] for items in per_chat] if onevision else images
        batch = processor(text=texts, images=[n for n in nested if n] if images else None, return_tensors="pt",
                          padding=True)
    finally:
        tok.padding_side = old_side
    batch.update(packed)
    moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    return batch.to(**moves) if moves else batch
