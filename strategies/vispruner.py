"""VisPruner (ICCV'25): important tokens by CLS attention, then diverse ones by iterative
duplicate removal on the vision tower's features.

Follows ``LlavaMetaForCausalLM.encode_images`` of the official code (Theia-4869/VisPruner @
aefa01a): ``int(k * important_ratio)`` tokens with the highest CLS attention; the rest, in
descending attention order, are thinned in rounds: split into even and odd positions, give
each even one its highest cosine similarity to an odd one, drop the ``min(8, R - need)`` even
ones with the highest similarity (the survivors, in descending-similarity order, then all odd
ones, form the next round's list) until ``k`` tokens are left.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.errors import InvalidInputError
from resprune.interfaces import Selector
from resprune.linalg import unit_rows  # a zero row stays zero (the official codes divide by 0)


def similarity_features(context: PruneContext, tokens: Tensor, field: str, requester: str) -> Tensor:
    """The features a similarity is measured on: the stage's ``tokens``, or a context field."""
    if field == "tokens":
        return tokens
    features = torch.as_tensor(context.get(field, requester=requester), device=tokens.device)
    if features.dim() == 2:  # one image, as with 2-D tokens
        features = features.unsqueeze(0)
    if features.dim() != 3 or features.shape[:2] != tokens.shape[:2]:
        raise InvalidInputError(f"context '{field}' has shape {tuple(features.shape)}; {requester} needs "
                                f"[B, N, C] (or [N, C]) with B, N = {tuple(tokens.shape[:2])}.")
    return features.float()


@dataclass
class SimilarityParams:
    """Params of a selector that ranks by a score and measures similarity on some features."""

    score: str = "cls_attention"
    """The importance score (the official code: CLS attention of the feature layer)."""
    features: str = "vision_features"
    """Where similarity is measured: `vision_features` (the features entering the projector, as
    the official code does) or `tokens` (the stage's own tokens, e.g. inside the LLM)."""

    def __post_init__(self) -> None:
        if not self.score:
            raise ValueError("score must name a score")
        if not self.features:
            raise ValueError("features must be 'tokens' or a context field such as 'vision_features'")


class FeatureSelector(Selector):
    """A selector whose context needs depend on where it measures similarity (``features``)."""

    def __init__(self, params: Mapping[str, Any] | Any | None = None, /, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        field = self.params.features
        self.requires = frozenset() if field == "tokens" else frozenset({field})

    def required_scores(self) -> frozenset[str]:
        return frozenset({self.params.score})

    def features(self, context: PruneContext, tokens: Tensor) -> Tensor:
        return similarity_features(context, tokens, self.params.features, f"selector '{self.name}'")


class VisPruner(FeatureSelector):
    """Important tokens by CLS attention, then diverse ones by duplicate removal (VisPruner)."""

    name = "vispruner"
    description = "VisPruner: CLS-attention important tokens + diverse ones by duplicate removal"
    requires = frozenset({"vision_features"})

    @dataclass
    class Params(SimilarityParams):
        important_ratio: float = 0.5
        """Share of the budget taken by CLS attention, rounded down (the official default, 0.5)."""
        step: int = 8
        """Most tokens dropped per round (the official code: 8)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if not 0.0 <= self.important_ratio <= 1.0:
                raise ValueError(f"important_ratio={self.important_ratio} must be in [0, 1].")
            if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 1:
                raise ValueError(f"step={self.step!r} must be an int >= 1.")

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        ranked = torch.sort(scores[self.params.score], dim=-1, descending=True, stable=True).indices
        n_imp = int(k * self.params.important_ratio)
        important, residual = ranked[:, :n_imp], ranked[:, n_imp:]
        need = k - n_imp
        if need == 0:
            return important
        unit = unit_rows(self.features(context, tokens))
        gram = torch.bmm(unit, unit.transpose(1, 2))  # [B, N, N], gathered round by round
        rows = torch.arange(unit.shape[0], device=unit.device)[:, None, None]
        while True:
            r = min(self.params.step, residual.shape[1] - need)
            if r <= 0:
                break
            even, odd = residual[:, ::2], residual[:, 1::2]
            best = gram[rows, even[:, :, None], odd[:, None, :]].max(dim=-1).values  # [B, R_even]
            distinct = torch.sort(best, dim=-1, descending=True, stable=True).indices[:, r:]
            residual = torch.cat([even.gather(1, distinct), odd], dim=1)
        return torch.cat([important, residual], dim=1)


@hookimpl
def resprune_register_selectors(register):
    register(VisPruner)
