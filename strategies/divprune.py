"""DivPrune: greedy max-min diversity on cosine distance."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from resprune import hookimpl, kernels
from resprune.context import PruneContext
from resprune.interfaces import Selector
from resprune.linalg import safe_scale


class DivPrune(Selector):
    """Max-min diversity (DivPrune, CVPR'25), solved greedily.

    Distances are ``1 - cos``. The first pick is the token farthest from its nearest
    neighbour; each later pick maximises the distance to its nearest kept token.
    Ties go to the lower index.
    """

    name = "divprune"
    description = "DivPrune: greedy max-min cosine diversity"

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        v, energy = safe_scale(tokens.float().contiguous())  # no overflow in the norms, any layout alike
        unit = v / energy.sqrt().unsqueeze(-1).clamp_min(torch.finfo(v.dtype).tiny)
        dist = 1.0 - torch.bmm(unit, unit.transpose(1, 2))  # [B, N, N]
        return greedy_max_min(dist, k)


def greedy_max_min(dist: Tensor, k: int, method: str = "auto") -> Tensor:
    """``k`` greedy max-min picks ``[B, k]`` from distances ``[B, N, N]``: first the token
    farthest from its nearest neighbour, then each time the one farthest from its nearest
    kept token; the first maximum on ties.

    ``method``: ``torch`` (5 ops per pick, no host synchronisation), ``triton`` (one fused
    kernel per image, ``resprune.kernels``) or ``auto`` (``triton`` on CUDA when installed).
    """
    b, n, _ = dist.shape
    eye = torch.eye(n, dtype=torch.bool, device=dist.device)
    row = dist.masked_fill(eye, float("inf")).min(dim=-1)
    # read each nearest pair both ways: mutual nearest neighbours tie exactly for the first pick
    # (the tie goes to the lower index, not to an ulp by which the matmul is not symmetric)
    nearest = torch.minimum(row.values, dist.gather(1, row.indices.unsqueeze(1)).squeeze(1))
    if method == "auto":
        method = "triton" if dist.device.type == "cuda" and kernels.available(dist.device) else "torch"
    if method == "triton":
        return kernels.divprune_select(dist, nearest, k)
    if method != "torch":
        raise ValueError(f"method must be 'auto', 'torch' or 'triton', got {method!r}")
    rows_n = torch.arange(b, device=dist.device) * n
    flat_dist = dist.view(b * n, n)
    key = nearest  # distance to the nearest kept token (to the nearest neighbour before the first pick)
    picks = []
    for t in range(k):
        pick = key.argmax(dim=-1)
        picks.append(pick)
        flat = rows_n + pick
        row = flat_dist.index_select(0, flat)
        key = row if t == 0 else torch.minimum(key, row, out=key)
        key.view(-1).index_fill_(0, flat, float("-inf"))  # taken
    return torch.stack(picks, dim=1)


@hookimpl
def resprune_register_selectors(register):
    register(DivPrune)
