"""GPU kernels for the greedy selection loops (optional: ``pip install "resprune[triton]"``).

The PyTorch loops in ``resprune.linalg`` and ``resprune.strategies.divprune`` stay the
reference and the CPU path. On a CUDA device with Triton installed, ``method: auto``
runs these kernels instead: the whole greedy loop in one launch (or one launch per pick
for large ``N``), with no Python between the steps. ``TRITON_INTERPRET=1`` runs them on
CPU tensors through Triton's interpreter, which is how the tests compare them with the
reference on machines without a GPU (slowly: use small inputs).
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import Tensor

__all__ = ["available", "residual_select", "divprune_select", "choose_variant", "STEP_MIN_N"]

STEP_MIN_N = 1536
"""``choose_variant`` runs one launch per pick from this many tokens per image up, unless
the batch alone fills the GPU; below it, one persistent program per image."""


def choose_variant(batch: int, n: int) -> Literal["persistent", "step"]:
    """``step`` (a grid over tokens, one launch per pick) for large ``N`` and few images,
    else ``persistent`` (one program per image runs the whole loop)."""
    return "step" if n >= STEP_MIN_N and batch * n < 16 * STEP_MIN_N else "persistent"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "yes", "on"}


def available(device: torch.device | str) -> bool:
    """Whether the kernels can run on ``device``: CUDA with Triton installed, or CPU under
    ``TRITON_INTERPRET=1``."""
    kind = torch.device(device).type
    if kind not in ("cuda", "cpu") or (kind == "cpu" and not _interpreting()):
        return False
    if kind == "cuda" and _interpreting():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return kind == "cpu" or torch.cuda.is_available()


def _pow2(x: int, lo: int = 16, hi: int = 1024) -> int:
    return max(lo, min(hi, 1 << max(0, (x - 1).bit_length())))


def residual_select(gram: Tensor, energy0: Tensor, weights: Tensor, floor: Tensor, fallback: Tensor,
                    first: Tensor | None, k: int, *,
                    variant: Literal["auto", "persistent", "step"] = "auto", block_n: int | None = None) -> Tensor:
    """Greedy weighted residual-energy picks from a Gram matrix; the rules of
    ``resprune.linalg.greedy_residual_select``.

    Args:
        gram: float32 ``[B, N, N]`` Gram matrix of the (virtually scaled) tokens.
        energy0: float32 ``[B, N]`` initial energies (the Gram diagonal, or exact values).
        weights: float32 ``[B, N]`` weights ``w``.
        floor: float32 ``[B, N]`` degeneracy floors (``tol`` times the initial energies).
        fallback: float32 ``[B, N]`` fallback keys (negative, distinct), as the PyTorch loop
            builds them.
        first: int64 ``[B]`` forced first picks, or ``None``.
        k: picks per image.
        variant: ``persistent`` (one program per image), ``step`` (one launch per pick),
            or ``auto``.
        block_n: tokens per program block (a power of two; default by ``N``).

    Returns:
        int64 ``[B, k]`` in pick order.
    """
    from .greedy import build

    kernels = build()
    b, n, _ = gram.shape
    dev = gram.device
    gram = gram.contiguous()
    energy0 = energy0.float().contiguous()
    energy = energy0.clone()
    w, fl = weights.float().contiguous(), floor.float().contiguous()
    fb = fallback.float().contiguous().clone()
    factor = torch.empty(b, k, n, device=dev, dtype=torch.float32)
    out = torch.empty(b, k, device=dev, dtype=torch.long)
    has_first = first is not None
    first_t = (first.to(device=dev, dtype=torch.long).contiguous() if has_first
               else torch.zeros(1, device=dev, dtype=torch.long))
    if variant == "auto":
        variant = choose_variant(b, n)
    if variant == "persistent":
        block = block_n or _pow2(n, 16, 256)
        kernels["residual_persistent"][(b,)](
            gram, energy, w, fl, fb, first_t, factor, out, n, k,
            gram.stride(0), gram.stride(1), energy.stride(0), factor.stride(0), factor.stride(1), out.stride(0),
            HAS_FIRST=has_first, BLOCK_N=block, BLOCK_T=16, num_warps=4)
        return out
    if variant != "step":
        raise ValueError(f"variant must be 'auto', 'persistent' or 'step', got {variant!r}")
    block = block_n or 64
    nb = -(-n // block)
    parts = [torch.empty(b, 2, nb, device=dev, dtype=dt) for dt in (torch.float32, torch.int32, torch.float32)]
    step = kernels["residual_step"]
    common = dict(HAS_FIRST=has_first, BLOCK_N=block, BLOCK_T=16, BLOCK_P=_pow2(nb, 2, 4096), num_warps=4)
    strides = (gram.stride(0), gram.stride(1), energy.stride(0), factor.stride(0), factor.stride(1), out.stride(0),
               parts[0].stride(0))
    for t in range(-1, k):  # t = -1: the initial block maxima
        step[(b, nb)](gram, energy0, energy, w, fl, fb, first_t, factor, out, *parts, n, max(t, 0), nb, *strides,
                      INIT=t < 0, **common)
    return out


def divprune_select(dist: Tensor, nearest: Tensor, k: int, *, block_n: int | None = None) -> Tensor:
    """DivPrune's greedy max-min picks from a distance matrix ``[B, N, N]`` and each token's
    distance to its nearest neighbour ``[B, N]`` (the first pick maximises it)."""
    from .greedy import build

    b, n, _ = dist.shape
    dist = dist.float().contiguous()
    nearest = nearest.float().contiguous()
    to_kept = torch.empty_like(nearest)
    out = torch.empty(b, k, device=dist.device, dtype=torch.long)
    build()["divprune_persistent"][(b,)](dist, nearest, to_kept, out, n, k, dist.stride(0), dist.stride(1),
                                         nearest.stride(0), out.stride(0), BLOCK_N=block_n or _pow2(n, 16, 256),
                                         num_warps=4)
    return out
