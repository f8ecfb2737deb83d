"""The embedded default job: prune a bundled photograph's patch tokens with every selector."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .budget import resolve_budget
from .linalg import optimal_residual, span_residual
from .selection import select
from .visualize import overlay_grid

__all__ = ["PHOTOS", "photo_path", "pixel_tokens", "compare_selectors", "run_demo"]

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
"""Bundled public-domain / CC0 photographs (see resprune/data/photos/PROVENANCE.md)."""

DEMO_SELECTORS: tuple[tuple[str, dict], ...] = (
    ("residual_energy", {"seed": "norm"}),
    ("dpp", {}),
    ("divprune", {}),
    ("topk", {"score": "norm"}),
    ("uniform", {}),
    ("random", {"seed": 0}),
)


def photo_path(name: str) -> Path:
    """Path of a bundled photo by name (``astronaut``, ``chelsea``, ``coffee``, ``rocket``)."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; bundled photos: {', '.join(PHOTOS)}")
    return Path(str(resources.files("resprune") / "data" / "photos" / f"{name}.jpg"))


def pixel_tokens(image: Image.Image, grid: int = 24, patch: int = 14) -> tuple[Tensor, Image.Image]:
    """Square-resize ``image`` and cut it into ``grid x grid`` patches of ``patch`` px.

    Returns the tokens ``[grid * grid, 3 * patch * patch]`` (raster order, values in
    [0, 1]) and the resized image.
    """
    side = grid * patch
    img = image.convert("RGB").resize((side, side), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)  # [H, W, 3]
    tokens = arr.reshape(grid, patch, grid, patch, 3).permute(0, 2, 1, 3, 4).reshape(grid * grid, -1)
    return tokens.contiguous(), img


def compare_selectors(tokens: Tensor, budget: int | float, grid: tuple[int, int],
                      selectors: tuple[tuple[str, dict], ...] = DEMO_SELECTORS) -> list[dict]:
    """Run each selector on ``tokens`` and measure how well the kept ones span the rest."""
    n = tokens.shape[0]
    k = resolve_budget(budget, n)
    total = float(tokens.double().pow(2).sum())
    best = optimal_residual(tokens, k)
    scores = {"norm": tokens.norm(dim=-1)}
    rows = []
    for name, params in selectors:
        start = time.perf_counter()
        kept = select(tokens, k, selector=name, scores=scores, context={"grid": grid}, order="selection", **params)
        ms = (time.perf_counter() - start) * 1e3
        resid = span_residual(tokens, kept)
        rows.append({"selector": name, "k": k, "n": n, "ms": ms, "kept": kept,
                     "residual": resid / total, "vs_svd": resid / best if best > 0 else float("nan")})
    return rows


def run_demo(photo: str = "astronaut", budget: int | float = 64, out: str | Path = "resprune-demo.png",
             print_fn=print) -> list[dict]:
    """Prune a bundled photo's 24x24 patch tokens with each selector; print a table; save an overlay."""
    torch.manual_seed(0)
    image = Image.open(photo_path(photo))
    tokens, resized = pixel_tokens(image)
    grid = (24, 24)
    rows = compare_selectors(tokens, budget, grid)
    k, n = rows[0]["k"], rows[0]["n"]
    print_fn(f"resprune demo: photo '{photo}' as {n} patch tokens (24x24 grid of 14 px RGB patches, d={tokens.shape[1]})")
    print_fn(f"keeping k={k} of {n} tokens ({100 * (1 - k / n):.1f}% pruned)\n")
    print_fn(f"{'selector':<16} {'kept':>5} {'residual %':>11} {'x SVD optimum':>14} {'select ms':>10}")
    for r in rows:
        print_fn(f"{r['selector']:<16} {r['k']:>5} {100 * r['residual']:>11.2f} {r['vs_svd']:>14.2f} {r['ms']:>10.2f}")
    print_fn("\nresidual %: energy of all tokens outside the span of the kept ones (Eq. 8), lower is better;")
    print_fn("x SVD optimum: that residual over the best any rank-k subspace can do (>= 1).")
    out = Path(out)
    overlay_grid(resized, rows[0]["kept"], grid, path=out)
    print_fn(f"\noverlay of residual_energy's kept patches (dropped ones dimmed): {out.resolve()}")
    print_fn("These are raw pixel patches, so no text relevance is used; on a model the same selectors")
    print_fn("run on the projector's output tokens, weighted by the instruction's keywords.")
    return rows
