"""SCOPE (NeurIPS'25): saliency-coverage oriented selection.

Follows ``SCOPE`` in ``scope/clip_encoder.py`` of the official code (kinredon/SCOPE @ 6bf7306):
with ``S`` the cosine similarity of the vision tower's features and ``c_i`` the coverage of
token ``i`` so far (its largest similarity to a kept token, starting at 0), each step keeps
the token ``j`` with the largest ``sum_i max(0, S_ij - c_i) * a_j ** alpha``, ``a`` being
the CLS attention; then ``c = max(c, S_j)``. The first maximum wins a tie.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext

from resprune.linalg import unit_rows

from .vispruner import FeatureSelector, SimilarityParams


class Scope(FeatureSelector):
    """Greedy coverage gain times saliency (SCOPE)."""

    name = "scope"
    description = "SCOPE: greedy set-coverage gain weighted by CLS-attention saliency"
    requires = frozenset({"vision_features"})

    @dataclass
    class Params(SimilarityParams):
        alpha: float = 1.0
        """Saliency exponent (the official scripts: `ALPHA=1.0`)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.alpha < 0:
                raise ValueError(f"alpha={self.alpha} must be >= 0.")

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        unit = unit_rows(self.features(context, tokens))
        sim = torch.bmm(unit, unit.transpose(1, 2))  # [B, N, N]
        weight = scores[self.params.score].clamp_min(0) ** self.params.alpha
        b, n = weight.shape
        rows = torch.arange(b, device=sim.device)
        cover = torch.zeros(b, n, device=sim.device)
        taken = torch.zeros(b, n, dtype=torch.bool, device=sim.device)
        picks = []
        for _ in range(k):
            gain = (sim - cover[:, :, None]).clamp_min(0).sum(dim=1) * weight  # [B, N] per candidate column
            pick = gain.masked_fill(taken, float("-inf")).argmax(dim=-1)
            picks.append(pick)
            taken[rows, pick] = True
            cover = torch.maximum(cover, sim[rows, pick])
        return torch.stack(picks, dim=1)


@hookimpl
def resprune_register_selectors(register):
    register(Scope)
