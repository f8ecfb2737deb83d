"""Test helpers: structured random token sets and tie-aware comparisons."""

from __future__ import annotations

import torch
from torch import Tensor

from resprune.linalg import DEFAULT_TOL
from resprune.testing.reference import residual_energies


def make_tokens(n: int, d: int, *, rank: int | None = None, dups: int = 0, zeros: int = 0,
                scale: float = 1.0, seed: int = 0, batch: int | None = None) -> Tensor:
    """Gaussian tokens with optional low rank, duplicated rows and zero rows."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch,) if batch else ()
    if rank is not None and rank < min(n, d):
        v = torch.randn(*shape, n, rank, generator=gen, dtype=torch.float64) @ torch.randn(
            *shape, rank, d, generator=gen, dtype=torch.float64)
    else:
        v = torch.randn(*shape, n, d, generator=gen, dtype=torch.float64)
    v = v * scale
    for j in range(min(dups, n - 1)):
        v[..., n - 1 - j, :] = v[..., j, :]
    for j in range(min(zeros, n)):
        v[..., j * 2 % n, :] = 0.0
    return v.float()


def weighted_gap(tokens: Tensor, kept: list[int], i: int, j: int, weights: Tensor | None) -> float:
    """Relative difference of the weighted brute-force energies of candidates i and j."""
    e = residual_energies(tokens, kept)
    w = torch.ones_like(e) if weights is None else weights.double()
    a, b = float(e[i] * w[i]), float(e[j] * w[j])
    scale = max(float((tokens.double().pow(2).sum(-1) * w).max()), 1e-30)
    return abs(a - b) / scale


def assert_same_up_to_ties(tokens: Tensor, a: list[int], b: list[int], weights: Tensor | None = None,
                           rtol: float = 1e-4) -> None:
    """``a == b``, or they part at a pick where both candidates are (numerically) tied."""
    for t, (x, y) in enumerate(zip(a, b)):
        if x != y:
            e = residual_energies(tokens, a[:t])
            e0 = tokens.double().pow(2).sum(-1)
            in_span = bool(e[x] <= 2 * DEFAULT_TOL * e0[x]) and bool(e[y] <= 2 * DEFAULT_TOL * e0[y])
            if in_span:  # the fallback order: initial weighted energy, descending; a tie may go either way
                w = torch.ones_like(e0) if weights is None else weights.double()
                kx, ky = float(e0[x] * w[x]), float(e0[y] * w[y])
                assert abs(kx - ky) <= rtol * max(kx, ky, 1e-30), (
                    f"fallback order differs at step {t} ({x} vs {y}): both lie in the kept span, their weighted "
                    f"initial energies differ ({kx:.6g} vs {ky:.6g})")
                return
            gap = weighted_gap(tokens, a[:t], x, y, weights)
            assert gap <= rtol, f"selections part at step {t} ({x} vs {y}) without a tie (gap {gap:.3g})"
            return
    assert len(a) == len(b)
