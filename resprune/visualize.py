"""Pictures of a selection: kept patches shown, dropped ones dimmed (the paper's Fig. 2 style)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

__all__ = ["overlay_grid"]


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
