"""CDPruner-style conditional DPP: greedy MAP inference on diag(r) S diag(r)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.interfaces import Selector
from resprune.linalg import DEFAULT_TOL, METHODS, greedy_residual_select, safe_scale
from resprune.params import check_choice, check_range


class ConditionalDPP(Selector):
    """Greedy MAP of a DPP with kernel ``L = diag(r) S diag(r)``, ``S`` = cosine similarity.

    ``L = U U^T`` with ``u_i = r_i v_i / ||v_i||``, so the greedy MAP steps (Chen et al.,
    2018) are pivoted Cholesky steps on ``U``: the same kernel as ``residual_energy``, with
    unit weights and no seed. ``r`` is min-max normalised per image as in CDPruner
    (``normalize: none`` uses it as given; a missing score means ``r = 1``).
    """

    name = "dpp"
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
        """As for `residual_energy`: `incremental`, `gram`, `blocked`, `triton` or `auto`."""

        def __post_init__(self) -> None:
            check_choice("normalize", self.normalize, ("minmax", "none"))
            check_choice("method", self.method, METHODS)
            check_range("tol", self.tol, low=0.0, high=0.5)

    def optional_scores(self) -> frozenset[str]:
        return frozenset({self.params.relevance})

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        v, energy = safe_scale(tokens.float().contiguous())
        norm = energy.sqrt()
        nonzero = norm > 0
        scale = torch.where(nonzero, 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)  # u_i = scale_i v_i
        r = scores.get(self.params.relevance)
        if r is None:
            r = torch.ones_like(norm)
        else:
            if self.params.normalize == "minmax":
                lo = r.min(dim=-1, keepdim=True).values
                span = r.max(dim=-1, keepdim=True).values - lo
                r = torch.where(span > 0, (r - lo) / span.clamp_min(torch.finfo(r.dtype).tiny), torch.ones_like(r))
            r = r.clamp_min(0)
        # ||u_i||^2 = r_i^2 exactly: equal qualities tie exactly and go to the lower index
        energy0 = torch.where(nonzero, r.square(), 0.0)
        return greedy_residual_select(v, k, tol=self.params.tol, method=self.params.method, row_scale=scale * r,
                                      energy0=energy0)


@hookimpl
def resprune_register_selectors(register):
    register(ConditionalDPP)
