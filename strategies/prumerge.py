"""PruMerge (ICCV'25): CLS-attention picks, each enriched by its key-similar neighbours.

Follows ``CLIPVisionTower.token_prune_merge_advanced`` of the official code (42Shawn/LLaVA-PruMerge
@ 097c041): the CLS attention of the tower's last layer, computed as one head over the
concatenated heads (``softmax(q_cls k^T / sqrt(C))``); the tokens with the highest attention
kept, in descending attention; each kept token becomes itself plus the attention-weighted sum
of the 32 other tokens whose last-layer keys are most cosine-similar to its own; one more token
is the attention-weighted sum of every token left out. All on the features entering the
projector, then projected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.interfaces import Merger, Scorer
from resprune.linalg import unit_rows

__all__ = ["LastClsAttention", "PruMerge"]


class LastClsAttention(Scorer):
    """The last layer's CLS attention as PruMerge computes it (one head over the concatenated heads)."""

    name = "last_cls_attention"
    output = "last_cls_attention"
    description = "PruMerge's CLS attention: the tower's last layer, one head over the concatenated heads (CLIP towers)"
    requires = frozenset({"last_cls_attention"})

    def score(self, context: PruneContext) -> Tensor:
        att = context.get("last_cls_attention", requester=f"scorer '{self.name}'")
        return torch.as_tensor(att, device=context.tokens.device).float().reshape(context.batch_size, -1)


class PruMerge(Merger):
    """PruMerge's merge (official code): kept tokens enriched by their 32 key-nearest neighbours, plus
    the attention-weighted sum of the rest."""

    name = "prumerge"
    description = "PruMerge (official): each kept token + the attention-weighted sum of its 32 key-nearest tokens, " \
                  "one more token of the rest, pre-projector"
    requires = frozenset({"vision_features", "last_keys", "projector"})

    @dataclass
    class Params:
        score: str = "last_cls_attention"
        """The attention that ranks and weighs the tokens (PruMerge: the last layer's, one head)."""
        neighbours: int = 32
        """Key-nearest tokens added to each kept one (the official code's `k=int(32)`)."""

        def __post_init__(self) -> None:
            if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 0:
                raise ValueError(f"neighbours={self.neighbours!r} must be an int >= 0")

    def required_scores(self) -> frozenset[str]:
        return frozenset({self.params.score})

    def extra(self, k: int, n: int) -> int:
        return 1 if k < n else 0  # the sum of the tokens left out, on top of the picks (as the official code)

    def merge(self, tokens: Tensor, kept: Tensor, slots: int, scores: Mapping[str, Tensor],
              context: PruneContext) -> tuple[Tensor, Tensor]:
        b, n, d = tokens.shape
        if slots == 0:
            return kept, tokens.gather(1, kept[..., None].expand(*kept.shape, d))
        who = f"merger '{self.name}'"
        attention = scores[self.params.score].float()  # the stage checks that a scorer wrote it (required_scores)
        vision = context.get("vision_features", requester=who).float()
        keys = unit_rows(context.get("last_keys", requester=who).float())
        c = vision.shape[-1]
        # the kept tokens in descending attention: the official order (torch.topk's)
        order = attention.gather(1, kept).argsort(dim=1, descending=True, stable=True)
        picks = kept.gather(1, order)  # [B, k]
        similarity = keys.gather(1, picks[..., None].expand(-1, -1, keys.shape[-1])) @ keys.transpose(1, 2)
        similarity.scatter_(2, picks[..., None], -torch.inf)  # a token is not its own neighbour
        count = min(self.params.neighbours, n - 1)
        near = similarity.topk(count, dim=2).indices  # [B, k, count]
        weights = attention.gather(1, near.flatten(1)).view_as(near)
        members = vision.gather(1, near.flatten(1)[..., None].expand(-1, -1, c)).view(b, *near.shape[1:], c)
        updated = (members * weights[..., None]).sum(dim=2) + vision.gather(1, picks[..., None].expand(-1, -1, c))
        is_kept = torch.zeros(b, n, dtype=torch.bool, device=tokens.device).scatter_(1, kept, True)
        rest = ((~is_kept).float() * attention)[..., None] * vision  # the tokens left out, weighted
        features = context.get("projector", requester=who)(torch.cat([updated, rest.sum(dim=1, keepdim=True)], dim=1))
        first_out = torch.sort((~is_kept).to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :1]
        return torch.cat([picks, first_out], dim=1), features  # the sequence: picks by attention, then the rest


@hookimpl
def resprune_register_scorers(register):
    register(LastClsAttention)


@hookimpl
def resprune_register_mergers(register):
    register(PruMerge)
