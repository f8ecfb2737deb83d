"""Slow, obviously correct reference implementations (float64, explicit projections).

They follow the definitions literally and are what the fast kernels are tested and
benchmarked against. They are not meant for real use.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..linalg import DEFAULT_TOL

__all__ = [
    "residual_energies",
    "greedy_residual_reference",
    "total_residual",
    "optimal_rank_k_residual",
    "divprune_reference",
]


def residual_energies(tokens: Tensor, kept: list[int] | Tensor) -> Tensor:
    """``E_S(v_i) = ||v_i - P_S v_i||^2`` for every token, with ``P_S`` built directly.

    ``P_S`` is the orthogonal projector onto the span of the kept tokens, computed from
    an SVD of the kept rows (so rank deficiency is handled), in float64.
    """
    v = tokens.double()
    kept = torch.as_tensor(kept, dtype=torch.long)
    if kept.numel() == 0:
        return v.pow(2).sum(-1)
    basis = v[kept]  # [|S|, d]
    u, s, vh = torch.linalg.svd(basis, full_matrices=False)
    rank = int((s > s.max() * 1e-10).sum()) if s.numel() and s.max() > 0 else 0
    q = vh[:rank]  # orthonormal rows spanning W(S)
    resid = v - (v @ q.T) @ q
    return resid.pow(2).sum(-1)


def total_residual(tokens: Tensor, kept: list[int] | Tensor) -> float:
    """``||V - P_S V||_F^2`` (Eq. 8 of the paper)."""
    return float(residual_energies(tokens, kept).sum())


def optimal_rank_k_residual(tokens: Tensor, k: int) -> float:
    """The smallest ``||V - P V||_F^2`` over all rank-``k`` projectors (SVD tail energy)."""
    s = torch.linalg.svdvals(tokens.double())
    return float(s[k:].pow(2).sum())


def greedy_residual_reference(
    tokens: Tensor,
    k: int,
    *,
    weights: Tensor | None = None,
    first: int | None = None,
    tol: float = DEFAULT_TOL,
    dtype: torch.dtype = torch.float64,
) -> list[int]:
    """Naive greedy residual selection for one image (``tokens`` is ``[N, d]``).

    Keeps the full residual matrix ``R = V - P_S V`` and updates all of it per step
    (``R <- R - (R q) q^T``), recomputing every energy from ``R``. Same pick rule,
    tolerance and fallback as ``resprune.linalg.greedy_residual_select``.
    """
    v = tokens.to(dtype)
    n = v.shape[0]
    w = torch.ones(n, dtype=dtype) if weights is None else weights.to(dtype)
    energy0 = v.pow(2).sum(-1)
    fallback = sorted(range(n), key=lambda i: (-float(w[i] * energy0[i]), i))
    resid = v.clone()
    picked: list[int] = []
    for t in range(k):
        energy = resid.pow(2).sum(-1)
        if t == 0 and first is not None:
            i = int(first)
        else:
            live = [j for j in range(n) if j not in picked and energy[j] > tol * energy0[j]]
            if live:
                i = max(live, key=lambda j: (float(energy[j] * w[j]), -j))
            else:
                i = next(j for j in fallback if j not in picked)
        picked.append(i)
        if energy[i] > tol * energy0[i]:
            q = resid[i] / resid[i].norm()
            resid = resid - torch.outer(resid @ q, q)
    return picked


def divprune_reference(tokens: Tensor, k: int) -> list[int]:
    """Greedy max-min diversity on cosine distance, written with plain loops."""
    v = tokens.double()
    vn = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dist = 1.0 - vn @ vn.T
    n = v.shape[0]
    if n == 1:
        return [0]
    nearest = [min(float(dist[i, j]) for j in range(n) if j != i) for i in range(n)]
    picked = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(picked) < k:
        best = max((j for j in range(n) if j not in picked),
                   key=lambda j: (min(float(dist[j, s]) for s in picked), -j))
        picked.append(best)
    return picked
