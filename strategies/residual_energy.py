"""ResPrune: greedy text-weighted residual-energy selection (Algorithm 1 of the paper)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.interfaces import Selector
from resprune.linalg import DEFAULT_TOL, METHODS, greedy_residual_select
from resprune.params import check_choice, check_range


class ResidualEnergy(Selector):
    """Greedily keep the token with the largest weighted residual energy.

    ``E_S(v_i) * (r_i + eps)^alpha``, where ``E_S(v_i) = ||v_i - P_S v_i||^2`` is the
    energy of token ``i`` outside the span of the tokens kept so far and ``r_i`` the
    text relevance (score ``relevance``; uniform when that score is absent).
    """

    name = "residual_energy"
    aliases = ("resprune",)
    description = "ResPrune: greedy subspace reconstruction weighted by text relevance"

    @dataclass
    class Params:
        alpha: float = 1.0
        """Text guidance strength; `0` gives purely geometric selection. Must be >= 0."""
        eps: float = 1e-6
        """Added to the relevance before the power, for stability. Must be >= 0."""
        seed: str = "none"
        """Score whose argmax is the first pick (`cls_attention`, `norm`, `relevance`,
        `mean_similarity`, `center`, ...), which must then be present; or `none`: the first pick
        is the argmax of the weighted energy."""
        relevance: str = "relevance"
        """Score used as the relevance r (clamped at 0); a missing score means uniform weights."""
        tol: float = DEFAULT_TOL
        """Relative residual energy under which a token counts as inside the kept span. In [0, 0.5]."""
        energy_fraction: float = 0.0
        """A budget as an energy fraction: each image keeps as few tokens as it takes for their
        span to hold this fraction of its tokens' energy (the sum of their squared norms), at most
        the stage's budget; `0` (default): the budget is the count. In [0, 1)."""
        method: str = "auto"
        """How Gram columns are computed: `incremental` (one matrix-vector product per
        step), `gram` (the full Gram matrix once), `blocked` (a block of likely picks at once;
        CPU), `triton` (the Gram matrix once, then the loop in fused GPU kernels; needs Triton)
        or `auto` (chosen from N, d, k, the batch and the device: `triton` on CUDA when installed)."""

        def __post_init__(self) -> None:
            check_range("alpha", self.alpha, low=0.0)
            check_range("eps", self.eps, low=0.0)
            check_range("tol", self.tol, low=0.0, high=0.5)
            check_range("energy_fraction", self.energy_fraction, low=0.0)
            if not self.energy_fraction < 1.0:
                raise ValueError(f"energy_fraction must be below 1, got {self.energy_fraction!r}")
            check_choice("method", self.method, METHODS)
            if not self.seed or not self.relevance:
                raise ValueError("seed and relevance must be score names ('none' for no seed)")

    def required_scores(self) -> frozenset[str]:
        return frozenset() if self.params.seed == "none" else frozenset({self.params.seed})

    def optional_scores(self) -> frozenset[str]:
        return frozenset({self.params.relevance})

    @property
    def adaptive(self) -> bool:
        return self.params.energy_fraction > 0

    def count(self, scores: Mapping[str, Tensor], context: PruneContext) -> list[int]:
        """With ``energy_fraction``: the picks each image needs for its kept span to hold that
        fraction of its energy (the greedy runs until then; ``select`` runs it again)."""
        tokens = context.tokens
        counts: list[int] = []
        greedy_residual_select(tokens, tokens.shape[1], until_fraction=self.params.energy_fraction, counts=counts,
                               **self._settings(scores))
        return counts

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        return greedy_residual_select(tokens, k, **self._settings(scores))

    def _settings(self, scores: Mapping[str, Tensor]) -> dict:
        p = self.params
        weights = None
        relevance = scores.get(p.relevance)
        if relevance is not None and p.alpha != 0:
            weights = (relevance.clamp_min(0) + p.eps).pow(p.alpha)
        first = None if p.seed == "none" else scores[p.seed].argmax(dim=-1)
        return {"weights": weights, "first": first, "tol": p.tol, "method": p.method}


@hookimpl
def resprune_register_selectors(register):
    register(ResidualEnergy)
