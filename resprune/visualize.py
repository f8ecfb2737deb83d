"""Pictures of a selection: kept patches shown, dropped ones dimmed (the paper's Fig. 2 style)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

__all__ = ["overlay_grid", "overlay_selection", "overlay_stages", "overlay_video"]


def overlay_grid(image: Image.Image, kept: Tensor | list[int], grid: tuple[int, int], *,
                 dim: float = 0.25, outline: tuple[int, int, int] | None = (255, 255, 255),
                 path: str | Path | None = None) -> Image.Image:
    """Dim the cells of a ``rows x cols`` patch grid that were not kept.

    Args:
        image: the picture the tokens come from (any size; cells scale to it).
        kept: raster indices of the kept cells.
        grid: ``(rows, cols)``.
        dim: brightness left to dropped cells.
        outline: colour of a thin frame around kept cells (``None``: no frame).
        path: if given, the PNG is also written there.
    """
    rows, cols = grid
    img = image.convert("RGB")
    arr = np.asarray(img, dtype=np.float32).copy()
    h, w = arr.shape[:2]
    keep = np.zeros(rows * cols, dtype=bool)
    keep[[int(i) for i in kept]] = True
    ys = np.linspace(0, h, rows + 1).round().astype(int)
    xs = np.linspace(0, w, cols + 1).round().astype(int)
    for idx in np.flatnonzero(~keep):
        r, c = divmod(int(idx), cols)
        arr[ys[r]:ys[r + 1], xs[c]:xs[c + 1]] *= dim
    out = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if outline is not None:
        draw = ImageDraw.Draw(out)
        for idx in np.flatnonzero(keep):
            r, c = divmod(int(idx), cols)
            draw.rectangle([xs[c], ys[r], xs[c + 1] - 1, ys[r + 1] - 1], outline=outline)
    if path is not None:
        out.save(path)
    return out


def _cells(image: Image.Image, rc: np.ndarray, keep: np.ndarray, grid: tuple[int, int], dim: float,
           outline: tuple[int, int, int] | None) -> Image.Image:
    """Dim dropped cells / frame kept cells given each token's (row, col) in a grid."""
    rows, cols = grid
    arr = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    h, w = arr.shape[:2]
    ys = np.linspace(0, h, rows + 1).round().astype(int)
    xs = np.linspace(0, w, cols + 1).round().astype(int)
    for (r, c), k in zip(rc.astype(int), keep):
        if not k:
            arr[ys[r]:ys[r + 1], xs[c]:xs[c + 1]] *= dim
    out = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if outline is not None:
        draw = ImageDraw.Draw(out)
        for (r, c), k in zip(rc.astype(int), keep):
            if k:
                draw.rectangle([xs[c], ys[r], xs[c + 1] - 1, ys[r + 1] - 1], outline=outline)
    return out


def _center_square(image: Image.Image) -> Image.Image:
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s))


def overlay_selection(image: Image.Image, selection: Any, *, processor: Any = None, dim: float = 0.25,
                      outline: tuple[int, int, int] | None = (255, 255, 255), panel: int = 336,
                      path: str | Path | None = None) -> Image.Image:
    """Picture of what one image kept, in its backbone's geometry.

    - a single grid (LLaVA-1.5, Qwen2.5-VL after the 2x2 merge): kept patches shown,
      dropped ones dimmed; LLaVA's centre crop is applied when the processor crops;
    - LLaVA-NeXT AnyRes: the base view and the high-resolution crop grid side by side,
      with a strip for the row newlines (kept ones white, dropped ones dark); InternVL3's
      thumbnail and crop grid the same way (no newlines).

    Args:
        image: the original picture.
        selection: an ``ImageSelection`` (``attached.selections[i]``).
        processor: the model's processor, to know whether it centre-crops.
        panel: height in pixels of each drawn view.
    """
    geometry = selection.geometry
    layout = getattr(geometry, "layout", {}) or {}
    keep = selection.mask().cpu().numpy()
    img = image.convert("RGB")
    if layout.get("kind") == "anyres":
        return _anyres(img, keep, layout, dim, outline, panel, path)
    grid = layout.get("grid") or getattr(geometry, "grid", None)
    if grid is None:
        raise ValueError("this selection has no spatial grid to draw")
    image_processor = getattr(processor, "image_processor", None)
    if getattr(image_processor, "do_center_crop", False):
        img = _center_square(img)
    scale = panel / img.height
    img = img.resize((max(1, round(img.width * scale)), panel), Image.BICUBIC)
    rows, cols = grid
    rc = np.stack(np.divmod(np.arange(rows * cols), cols), axis=1)
    out = _cells(img, rc, keep, grid, dim, outline)
    if path is not None:
        out.save(path)
    return out


def overlay_video(frames: Sequence[Image.Image], selection: Any, *, dim: float = 0.25,
                  outline: tuple[int, int, int] | None = (255, 255, 255), panel: int = 168, gap: int = 4,
                  path: str | Path | None = None) -> Image.Image:
    """Contact sheet of what one video kept: one panel per frame group the model encodes together
    (Qwen2.5-VL: 2 frames, its first frame drawn; LLaVA-OneVision: 1), kept patches shown,
    dropped ones dimmed, the kept count under each panel.

    Args:
        frames: the video's frames, in time order (``Video.frames``).
        selection: an ``ImageSelection`` of that video (``attached.selections[i]``).
        panel: height in pixels of each frame.
    """
    layout = getattr(selection.geometry, "layout", {}) or {}
    if layout.get("kind") != "video":
        raise ValueError("this selection is not of a video (layout kind 'video'); use overlay_selection")
    t, (rows, cols) = int(layout["temporal"]), layout["grid"]
    keep = selection.mask().cpu().numpy()[: t * rows * cols].reshape(t, rows * cols)  # a trailing newline: no cell
    per_group = -(-len(frames) // t)  # frames per temporal patch
    rc = np.stack(np.divmod(np.arange(rows * cols), cols), axis=1)
    panels = []
    for i in range(t):
        frame = frames[min(i * per_group, len(frames) - 1)].convert("RGB")
        frame = frame.resize((max(1, round(frame.width * panel / frame.height)), panel), Image.BICUBIC)
        panels.append(_cells(frame, rc, keep[i], (rows, cols), dim, outline))
    label = 14
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    sheet = Image.new("RGB", (width, panel + label), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    x = 0
    for i, p in enumerate(panels):
        sheet.paste(p, (x, 0))
        draw.text((x + 2, panel + 1), f"t{i}: {int(keep[i].sum())}", fill=(255, 255, 255))
        x += p.width + gap
    if path is not None:
        sheet.save(path)
    return sheet


def _anyres(img: Image.Image, keep: np.ndarray, layout: dict, dim: float, outline: Any, panel: int,
            path: str | Path | None) -> Image.Image:
    tile = layout["tile"].cpu().numpy()
    newline = layout["newline"].cpu().numpy()
    rows, cols = layout["base_grid"]
    base_idx = np.flatnonzero((tile == 0) & ~newline)
    base_rc = np.stack(np.divmod(np.arange(len(base_idx)), cols), axis=1)
    base = _cells(img.resize((panel, panel), Image.BICUBIC), base_rc, keep[base_idx], (rows, cols), dim, outline)
    views = [base]
    if layout.get("crop_grid"):
        crop_idx = np.flatnonzero((tile > 0) & ~newline)
        h, w = layout["crop_grid"]
        rc = layout["crop_rc"].cpu().numpy()[crop_idx]
        width = max(1, round(panel * w / h))
        crop = _cells(img.resize((width, panel), Image.BICUBIC), rc, keep[crop_idx], (h, w), dim, outline)
        views.append(crop)
        nl_idx = np.flatnonzero(newline)
        if len(nl_idx):  # newline strip: one cell per crop row, right of the crop view
            strip = Image.new("RGB", (max(6, panel // max(h, 1)), panel), (0, 0, 0))
            draw = ImageDraw.Draw(strip)
            ys = np.linspace(0, panel, len(nl_idx) + 1).round().astype(int)
            for j, idx in enumerate(nl_idx):
                draw.rectangle([1, ys[j] + 1, strip.width - 2, ys[j + 1] - 2],
                               fill=(255, 255, 255) if keep[idx] else (60, 60, 60))
            views.append(strip)
    gap = 8
    out = Image.new("RGB", (sum(v.width for v in views) + gap * (len(views) - 1), panel), (0, 0, 0))
    x = 0
    for v in views:
        out.paste(v, (x, 0))
        x += v.width + gap
    if path is not None:
        out.save(path)
    return out


def overlay_stages(image: Image.Image, stages: list[tuple[str, Any]], *, processor: Any = None, dim: float = 0.25,
                   panel: int = 336, path: str | Path | None = None) -> Image.Image:
    """One ``overlay_selection`` panel per stage, side by side, each captioned.

    ``stages``: ``(caption, ImageSelection)`` pairs in running order, e.g.
    ``[("input", attached.selections[0]), ("layer 2", attached.last.stages[0].selections[0])]``:
    what survived each stage (a stage inside the LLM only keeps tokens the ones before kept).
    """
    panels = [overlay_selection(image, sel, processor=processor, dim=dim, panel=panel) for _, sel in stages]
    caption = 22
    width = sum(p.width for p in panels) + 8 * (len(panels) - 1)
    out = Image.new("RGB", (width, panel + caption), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    x = 0
    for (label, sel), pic in zip(stages, panels):
        out.paste(pic, (x, caption))
        draw.text((x + 4, 4), f"{label}: {sel.k} of {sel.n}", fill=(0, 0, 0))
        x += pic.width + 8
    if path is not None:
        out.save(path)
    return out
