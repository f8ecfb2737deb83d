"""CDPruner-style conditional DPP: greedy MAP inference on diag(r) S diag(r)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.interfaces import Selector
from resprune.linalg import DEFAULT_TOL, greedy_residual_select
from resprune.params import check_choice, check_range


class ConditionalDPP(Selector):
    """Greedy MAP of a DPP with kernel ``L = diag(r) S diag(r)``, ``S`` = cosine similarity.

    ``L = U U^T`` with ``u_i = r_i v_i / ||v_i||``, so the greedy MAP steps (Chen et al.,
    2018) are pivoted Cholesky steps on ``U``: the same kernel as ``residual_energy``, with
    unit weights and no seed. ``r`` is min-max normalised per image as in CDPruner
    (``normalize: none`` uses it as given; a missing score means ``r = 1``).
    """

    name = "dpp"
    aliases = ("cdpruner",)
    description = "CDPruner-style conditional DPP (greedy MAP)"

    @dataclass
    class Params:
        relevance: str = "relevance"
        """Score used as the quality term r; a missing score means r = 1."""
        normalize: str = "minmax"
        """`minmax` (per image, as CDPruner) or `none` (r as given, clamped at 0)."""
        tol: float = DEFAULT_TOL
        """As for `residual_energy`. In [0, 0.5]."""
        method: str = "auto"
        """As for `residual_energy`: `incremental`, `gram`, `blocked` or `auto`."""

        def __post_init__(self) -> None:
            check_choice("normalize", self.normalize, ("minmax", "none"))
            check_choice("method", self.method, ("auto", "incremental", "gram", "blocked"))
            check_range("tol", self.tol, low=0.0, high=0.5)

    def optional_scores(self) -> frozenset[str]:
        return frozenset({self.params.relevance})

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        scale = 1.0 / tokens.norm(dim=-1).clamp_min(torch.finfo(tokens.dtype).tiny)  # rows u_i = scale_i v_i
        r = scores.get(self.params.relevance)
        if r is not None:
            if self.params.normalize == "minmax":
                lo = r.min(dim=-1, keepdim=True).values
                span = r.max(dim=-1, keepdim=True).values - lo
                r = torch.where(span > 0, (r - lo) / span.clamp_min(torch.finfo(r.dtype).tiny), torch.ones_like(r))
            scale = scale * r.clamp_min(0)
        return greedy_residual_select(tokens, k, tol=self.params.tol, method=self.params.method, row_scale=scale)


@hookimpl
def resprune_register_selectors(register):
    register(ConditionalDPP)
