"""DivPrune: greedy max-min diversity on cosine distance."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from resprune import hookimpl
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
        b, n, _ = tokens.shape
        v, energy = safe_scale(tokens.float().contiguous())  # no overflow in the norms, any layout alike
        unit = v / energy.sqrt().unsqueeze(-1).clamp_min(torch.finfo(v.dtype).tiny)
        dist = 1.0 - torch.bmm(unit, unit.transpose(1, 2))  # [B, N, N]
        rows = torch.arange(b, device=tokens.device)
        eye = torch.eye(n, dtype=torch.bool, device=tokens.device)
        nearest = dist.masked_fill(eye, float("inf")).min(dim=-1).values
        pick = nearest.argmax(dim=-1)
        out = torch.empty(b, k, dtype=torch.long, device=tokens.device)
        taken = torch.zeros(b, n, dtype=torch.bool, device=tokens.device)
        to_kept = torch.full((b, n), float("inf"), device=tokens.device)
        for t in range(k):
            if t:
                pick = to_kept.masked_fill(taken, float("-inf")).argmax(dim=-1)
            out[:, t] = pick
            taken[rows, pick] = True
            to_kept = torch.minimum(to_kept, dist[rows, pick])
        return out


@hookimpl
def resprune_register_selectors(register):
    register(DivPrune)
