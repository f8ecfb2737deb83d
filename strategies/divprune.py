"""DivPrune: greedy max-min diversity on cosine distance."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from resprune import hookimpl, kernels
from resprune.context import PruneContext
from resprune.interfaces import Selector
from resprune.linalg import safe_scale
from resprune.params import check_choice


class DivPrune(Selector):
    """Max-min diversity (DivPrune, CVPR'25), solved greedily.

    Distances are ``1 - cos``. The first pick is the token farthest from its nearest
    neighbour; each later pick maximises the distance to its nearest kept token.
    Ties go to the lower index.
    """

    name = "divprune"
    description = "DivPrune: greedy max-min cosine diversity"

    @dataclass
    class Params:
        method: str = "auto"
        """`torch` (the PyTorch loop), `triton` (one fused GPU kernel per image; needs Triton)
        or `auto` (`triton` on CUDA when installed, else `torch`). Same picks up to float ties."""

        def __post_init__(self) -> None:
            check_choice("method", self.method, ("auto", "torch", "triton"))

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        b, n, _ = tokens.shape
        v, energy = safe_scale(tokens.float().contiguous())  # no overflow in the norms, any layout alike
        unit = v / energy.sqrt().unsqueeze(-1).clamp_min(torch.finfo(v.dtype).tiny)
        dist = 1.0 - torch.bmm(unit, unit.transpose(1, 2))  # [B, N, N]
        eye = torch.eye(n, dtype=torch.bool, device=tokens.device)
        nearest = dist.masked_fill(eye, float("inf")).min(dim=-1).values
        method = self.params.method
        if method == "auto":
            method = "triton" if tokens.device.type == "cuda" and kernels.available(tokens.device) else "torch"
        if method == "triton":
            return kernels.divprune_select(dist, nearest, k)
        # key: distance to the nearest kept token (the nearest neighbour before the first pick),
        # -inf once taken; 5 ops per step, no host synchronisation
        rows_n = torch.arange(b, device=tokens.device) * n
        flat_dist = dist.view(b * n, n)
        key = nearest
        picks = []
        for t in range(k):
            pick = key.argmax(dim=-1)  # the first maximum: ties go to the lower index
            picks.append(pick)
            row = flat_dist.index_select(0, rows_n + pick)
            key = row if t == 0 else torch.minimum(key, row, out=key)
            key.view(-1).index_fill_(0, rows_n + pick, float("-inf"))
        return torch.stack(picks, dim=1)


@hookimpl
def resprune_register_selectors(register):
    register(DivPrune)
