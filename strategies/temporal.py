"""Scores of a video's tokens over time.

``temporal_change``: how much a token differs from the token at the same place in the previous
frame. This is Efficient Video Sampling (EVS), as vLLM runs it for Qwen2.5-VL
(``vllm/multimodal/evs.py``, ``compute_retention_mask``; checked against vllm-project/vllm @ 094f117):
- the score is 1 minus the cosine similarity of the projector outputs of consecutive frames at one
  place;
- every token of the first frame scores 255, so it is kept first;
- top-k by the score, ties to the lower index (``topk``), keeps what changed.

The ``evs`` config pairs the two. A budget below one frame's tokens keeps part of the first
frame, where vLLM's count (``max(tokens per frame, int(N (1 - q)))``) would keep all of it: the
stage's budget rules here. Tokens after the last frame's grid that have no place in it (the
newline LLaVA-OneVision appends to a video) score 255 like the first frame: vLLM runs EVS on
Qwen only, so this is the project's choice.

``temporal`` (a merger): each token the selector dropped is averaged into the kept token at the
same place in the nearest earlier frame that kept that place (else the nearest later one), so a
static patch lives on in the one copy kept of it. Tokens of no place (a trailing newline) and
places kept in no frame are dropped as they are. ``min_similarity`` merges only tokens at least
that cosine-similar to their target (default -1: every one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.image_selection import frame_grid
from resprune.interfaces import Merger, Scorer
from resprune.params import check_range

FIRST_FRAME = 255.0
"""The score of every token of the first frame (vLLM's constant): above any dissimilarity (at most 2)."""


class TemporalChange(Scorer):
    """1 - cosine similarity to the same place in the previous frame; 255 for the first frame (EVS)."""

    name = "temporal_change"
    output = "temporal_change"
    description = "EVS: 1 - cosine to the same place in the previous frame (first frame 255)"
    requires = frozenset({"frames"})

    def score(self, context: PruneContext) -> Tensor:
        tokens = context.tokens
        b, n, d = tokens.shape
        frames = torch.as_tensor(context.get("frames", requester="scorer 'temporal_change'")).to(tokens.device)
        t, per = frame_grid(frames, n, "scorer 'temporal_change'")
        grid = per * t
        v = tokens[:, :grid].float().view(b, t, per, d)
        change = 1 - torch.nn.functional.cosine_similarity(v[:, 1:], v[:, :-1], dim=-1)
        first = torch.full((b, 1, per), FIRST_FRAME, device=tokens.device, dtype=change.dtype)
        placeless = torch.full((b, n - grid), FIRST_FRAME, device=tokens.device, dtype=change.dtype)
        return torch.cat([torch.cat([first, change], dim=1).view(b, grid), placeless], dim=1)


def temporal_owner(kept_mask: Tensor, t: int, per: int) -> Tensor:
    """``[B, t * per]`` for each token of the frame grid, the index of the kept token it merges into:
    the same place in the latest earlier frame that kept it, else the earliest later one; itself
    when kept; ``-1`` when no frame kept its place."""
    b = kept_mask.shape[0]
    grid = kept_mask[:, : t * per].view(b, t, per)
    frame = torch.arange(t, device=kept_mask.device).view(1, t, 1).expand(b, t, per)
    earlier = torch.where(grid, frame, torch.full_like(frame, -1)).cummax(dim=1).values  # latest kept frame <= f
    later = torch.where(grid, frame, torch.full_like(frame, t)).flip(1).cummin(dim=1).values.flip(1)  # earliest >= f
    target = torch.where(earlier >= 0, earlier, torch.where(later < t, later, torch.full_like(later, -1)))
    place = torch.arange(per, device=kept_mask.device).view(1, 1, per)
    owner = torch.where(target >= 0, target * per + place, torch.full_like(target, -1))
    return owner.view(b, t * per)


class TemporalMerge(Merger):
    """A dropped token averaged into the kept token at its place in the nearest frame (earlier first)."""

    name = "temporal"
    description = "merge each dropped video token into the kept token at the same place in the nearest frame"
    requires = frozenset({"frames"})

    @dataclass
    class Params:
        min_similarity: float = -1.0
        """Merge a dropped token only if its cosine similarity to its target is at least this
        (-1: always)."""

        def __post_init__(self) -> None:
            check_range("min_similarity", self.min_similarity, low=-1.0, high=1.0)

    def merge(self, tokens: Tensor, kept: Tensor, slots: int, scores: Mapping[str, Tensor],
              context: PruneContext) -> tuple[Tensor, Tensor]:
        b, n, d = tokens.shape
        frames = torch.as_tensor(context.get("frames", requester="merger 'temporal'")).to(tokens.device)
        t, per = frame_grid(frames, n, "merger 'temporal'")
        mask = torch.zeros(b, n, dtype=torch.bool, device=tokens.device).scatter_(1, kept, True)
        owner = torch.full((b, n), -1, dtype=torch.long, device=tokens.device)
        owner[:, : t * per] = temporal_owner(mask, t, per)
        owner = torch.where(mask, torch.full_like(owner, -1), owner)  # the kept ones are targets, not members
        if self.params.min_similarity > -1.0:
            unit = torch.nn.functional.normalize(tokens.float(), dim=-1)
            target = unit.gather(1, owner.clamp_min(0)[..., None].expand(b, n, d))
            similar = (unit * target).sum(-1) >= self.params.min_similarity
            owner = torch.where(similar, owner, torch.full_like(owner, -1))
        members = owner >= 0
        sums = tokens.float().clone()
        counts = torch.ones(b, n, dtype=sums.dtype, device=tokens.device)
        sums.scatter_add_(1, owner.clamp_min(0)[..., None].expand(b, n, d), tokens.float() * members[..., None])
        counts.scatter_add_(1, owner.clamp_min(0), members.to(sums.dtype))
        merged = sums / counts[..., None]
        return kept, merged.gather(1, kept[..., None].expand(*kept.shape, d))


@hookimpl
def resprune_register_scorers(register):
    register(TemporalChange)


@hookimpl
def resprune_register_mergers(register):
    register(TemporalMerge)
