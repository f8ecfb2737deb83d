"""CDPruner (NeurIPS'25): conditional DPP on the projector outputs, with CLIP relevance.

Follows ``LlavaMetaForCausalLM.encode_images`` of the official code (Theia-4869/CDPruner @
9541616): ``S`` the cosine similarity of the projector outputs (float32); ``r`` the relevance
(``clip_relevance``: the negated cosine to the question in CLIP's space) min-max normalised as
``(r - min + 1e-6) / (max - min)``; kernel ``L = diag(r) S diag(r)``; the greedy fast-MAP
inference of Chen et al. on ``L`` (incremental Cholesky rows, the largest remaining marginal
gain each step). The generic ``dpp`` selector runs the same MAP on the factor ``diag(r) V``
without forming ``L``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.interfaces import Selector
from resprune.linalg import unit_rows
from resprune.params import check_choice, check_range


def fast_map(kernel: Tensor, k: int) -> Tensor:
    """Greedy MAP of the DPP with ``kernel`` ``[B, N, N]`` as CDPruner computes it: ``k`` picks
    ``[B, k]`` in order (a pick whose marginal gain is no longer positive adds no Cholesky row)."""
    b, n, _ = kernel.shape
    rows = torch.arange(b, device=kernel.device)
    cis = torch.zeros(k, b, n, dtype=kernel.dtype, device=kernel.device)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    picks = torch.empty(k, b, dtype=torch.long, device=kernel.device)
    for i in range(k):
        j = torch.argmax(gains, dim=-1)
        picks[i] = j
        gain = gains[rows, j]
        eis = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])) / gain.clamp_min(
            torch.finfo(kernel.dtype).tiny).sqrt().unsqueeze(-1)
        eis = torch.where((gain > 0).unsqueeze(-1), eis, 0.0)  # the official divides by sqrt(<= 0): NaN
        cis[i] = eis
        gains -= eis.square()
        gains[rows, j] = -torch.inf
    return picks.t()


class CDPruner(Selector):
    """CDPruner's conditional DPP, as its official code computes it."""

    name = "cdpruner"
    description = "CDPruner (official): fast-MAP conditional DPP, min-max CLIP relevance, projector-output similarity"

    @dataclass
    class Params:
        relevance: str = "clip_relevance"
        """The quality score r (CDPruner: the negated CLIP cosine to the question)."""
        normalize: str = "minmax"
        """`minmax`: `(r - min + 1e-6) / (max - min)` per image (the official code, over its batch of one);
        `none`: r as given."""
        theta: Optional[float] = None
        """The official code's commented-out variant: `r = exp(alpha r)` with `alpha = theta / (2 (1 - theta))`;
        `null` (the default) keeps r as it is."""

        def __post_init__(self) -> None:
            check_choice("normalize", self.normalize, ("minmax", "none"))
            if self.theta is not None:
                check_range("theta", self.theta, low=0.0, high=1.0)
                if self.theta == 1.0:
                    raise ValueError("theta=1.0 must be < 1 (alpha = theta / (2 (1 - theta)))")

    def required_scores(self) -> frozenset[str]:
        return frozenset({self.params.relevance})

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        x = unit_rows(tokens.float())  # a zero token stays zero (the official divides by 0)
        similarity = x @ x.transpose(1, 2)
        r = scores[self.params.relevance].float()
        if self.params.normalize == "minmax":
            lo, hi = r.min(dim=-1, keepdim=True).values, r.max(dim=-1, keepdim=True).values
            r = (r - lo + 1e-6) / torch.where(hi > lo, hi - lo, 1.0)  # equal scores: the official divides by 0
        if self.params.theta is not None:
            r = torch.exp(self.params.theta / (2 * (1 - self.params.theta)) * r)
        kernel = r.unsqueeze(2) * similarity * r.unsqueeze(1)
        return fast_map(kernel, k)


@hookimpl
def resprune_register_selectors(register):
    register(CDPruner)
