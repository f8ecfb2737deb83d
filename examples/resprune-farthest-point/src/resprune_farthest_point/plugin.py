"""Farthest-point selection and a distinctiveness score, registered through resprune's hooks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

import resprune
from resprune import PruneContext, Scorer, Selector


class FarthestPoint(Selector):
    """Greedy k-center: each pick is the token farthest (Euclidean) from those kept so far.

    The first pick is the argmax of ``seed`` (a score name) or, with ``seed: none``, the
    token with the largest norm. Ties go to the lower index.
    """

    name = "farthest_point"
    description = "greedy k-center (farthest-point) sampling"

    @dataclass
    class Params:
        seed: str = "none"
        """Score whose argmax is the first pick, or 'none' (largest norm)."""

    def required_scores(self) -> frozenset[str]:
        return frozenset() if self.params.seed == "none" else frozenset({self.params.seed})

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        b, n, _ = tokens.shape
        sq = tokens.pow(2).sum(-1)  # [B, N]
        first = sq.argmax(-1) if self.params.seed == "none" else scores[self.params.seed].argmax(-1)
        out = torch.empty(b, k, dtype=torch.long, device=tokens.device)
        nearest = torch.full((b, n), float("inf"), device=tokens.device)
        taken = torch.zeros(b, n, dtype=torch.bool, device=tokens.device)
        rows = torch.arange(b, device=tokens.device)
        pick = first
        for t in range(k):
            out[:, t] = pick
            taken[rows, pick] = True
            center = tokens[rows, pick]  # [B, d]
            dist = (sq - 2 * torch.einsum("bnd,bd->bn", tokens, center) + sq[rows, pick, None]).clamp_min(0)
            nearest = torch.minimum(nearest, dist)
            pick = nearest.masked_fill(taken, -1.0).argmax(-1)
        return out


class Distinctiveness(Scorer):
    """``1 - max_j cos(v_i, v_j)`` over the other tokens: high for tokens unlike any other."""

    name = "distinctiveness"
    output = "distinctiveness"
    description = "one minus the largest cosine similarity to another token"

    def score(self, context: PruneContext) -> Tensor:
        unit = torch.nn.functional.normalize(context.tokens, dim=-1)  # [B, N, d]
        sim = torch.bmm(unit, unit.transpose(1, 2))
        sim.diagonal(dim1=1, dim2=2).fill_(-1.0)
        return 1.0 - sim.max(dim=-1).values


@resprune.hookimpl
def resprune_register_selectors(register):
    register(FarthestPoint, aliases=("kcenter",))


@resprune.hookimpl
def resprune_register_scorers(register):
    register(Distinctiveness)
