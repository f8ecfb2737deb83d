"""HiRED (AAAI'25): a token budget split over an image's tiles by early-layer CLS attention,
then the top tokens of each tile by the feature layer's CLS attention.

Follows ``HiRED_token_selection`` and ``HiRED_sub_img_budgets`` of the official code
(hasanar1f/HiRED @ 502d6dd, its patched ``modeling_llava_next.py`` and ``modeling_llava.py``):

1. the base (overview) image gets ``min(int(k * alpha), its tokens)`` of the budget ``k``,
   its tokens with the highest ``score`` (CLS attention of the feature layer, 22 of 24);
2. the crops share the rest (at most their size): the ``int(n_base * (1 - alpha))`` base
   tokens with the highest ``budget_score`` (CLS attention of encoder layer 0) are counted
   in ``C`` equal runs of the base image's raster order, one run per crop (the official
   ``reshape(num_patch_height, num_patch_width, -1)``), and crop ``i`` gets
   ``int(count_i / sum(count) * rest)`` tokens, its ones with the highest ``score``.

An image without crops (LLaVA-1.5, or tiles absent) keeps its top ``k`` tokens by ``score``,
as the official LLaVA-1.5 code does.

Deliberate difference: the official code keeps fewer than the budget when flooring the crop
shares leaves tokens over (and when unpadding removes picked tokens); resprune gives the
tokens left over to the not-yet-kept tokens with the highest ``score``, so a budget is met
exactly, and the official picks are always among resprune's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.errors import InvalidInputError
from resprune.interfaces import Selector


def _top(score: Tensor, where: Tensor, count: int) -> Tensor:
    """The ``count`` indices with the highest ``score`` among ``where`` (ties: lower index)."""
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=score.device)
    masked = score.masked_fill(~where, float("-inf"))
    return torch.sort(masked, descending=True, stable=True).indices[:count]


class HiRED(Selector):
    """Budget over tiles by early CLS attention, then top tokens per tile (HiRED)."""

    name = "hired"
    description = "HiRED: budget split over tiles by early-layer CLS attention, top tokens per tile"

    @dataclass
    class Params:
        alpha: float = 0.5
        """Share of the budget for the base image, and ``1 - alpha`` the share of its tokens that
        split the rest over the crops (the official scripts: 0.5)."""
        score: str = "cls_attention"
        """Ranks tokens inside a tile (the official code: CLS attention of layer 22, the feature layer)."""
        budget_score: str = "cls_attention_early"
        """Splits the crops' budget, read on the base image (the official code: CLS attention of
        layer 0); only needed when the image has crops."""

        def __post_init__(self) -> None:
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"alpha={self.alpha} must be in [0, 1].")
            if not self.score or not self.budget_score:
                raise ValueError("score and budget_score must name scores")

    def required_scores(self) -> frozenset[str]:
        return frozenset({self.params.score})

    def optional_scores(self) -> frozenset[str]:
        return frozenset({self.params.budget_score})

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        score = scores[self.params.score]
        tiles = context.maybe("tiles")
        if tiles is None or not bool((torch.as_tensor(tiles) > 0).any()):
            return torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]
        tiles = torch.as_tensor(tiles, device=score.device)
        early = scores.get(self.params.budget_score)
        if early is None:
            raise InvalidInputError(
                f"selector 'hired': the image has crop tiles, so it needs the score '{self.params.budget_score}' "
                f"(params.budget_score) to split their budget: add a scorer writing it, e.g. "
                f"{{name: cls_attention, params: {{layer: 0}}, output: {self.params.budget_score}}}.")
        return torch.stack([self._one(score[i], early[i], tiles, k) for i in range(score.shape[0])])

    def _one(self, score: Tensor, early: Tensor, tiles: Tensor, k: int) -> Tensor:
        alpha = self.params.alpha
        base = tiles == 0
        n_base = int(base.sum())
        crops = sorted(int(t) for t in tiles[tiles > 0].unique().tolist())
        sizes = torch.tensor([int((tiles == t).sum()) for t in crops], device=score.device)
        full = min(int(k * alpha), n_base)
        rest = min(k - full, int(sizes.sum()))
        picks = [_top(score, base, full)]
        if rest > 0:
            spatial = torch.zeros(n_base, dtype=torch.bool, device=score.device)
            spatial[_top(early[base], torch.ones_like(spatial), int(n_base * (1 - alpha)))] = True
            counts = torch.stack([run.sum() for run in spatial.tensor_split(len(crops))]).float()
            shares = (counts / counts.sum() * rest).nan_to_num(0.0).int().clamp(max=sizes)
            picks += [_top(score, tiles == t, int(s)) for t, s in zip(crops, shares.tolist())]
        kept = torch.cat(picks)
        left = k - kept.numel()
        if left > 0:  # what flooring left over: the highest-scoring tokens not yet kept
            free = torch.ones_like(score, dtype=torch.bool).index_fill_(0, kept, False)
            kept = torch.cat([kept, _top(score, free, left)])
        return kept


@hookimpl
def resprune_register_selectors(register):
    register(HiRED)
