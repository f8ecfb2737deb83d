"""Mergers: the dropped tokens live on in tokens within the budget.

* ``contextual`` (VisionZip): ``slots`` targets taken at a uniform stride from the dropped
  tokens; every other dropped token joins the target it is most cosine-similar to; each
  target becomes the mean of itself and its members and takes the target's place.
* ``nearest`` (PruMerge-style): no extra tokens; each dropped token is averaged into the
  kept token it is most similar to.

Similarity is measured on the stage's tokens (projector outputs before the LLM, hidden
states inside it); VisionZip measures it on the CLIP keys of layer -2 and merges before the
projector. Ties go to the lower index.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.interfaces import Merger
from resprune.params import check_range


def _dropped(n: int, kept: Tensor) -> Tensor:
    """``[B, N - k]`` the indices not in ``kept``, ascending (a stable sort: no host read, so a
    merger inside the LLM does not wait for the device)."""
    b = kept.shape[0]
    dropped = torch.ones(b, n, dtype=torch.uint8, device=kept.device).scatter_(1, kept, 0)
    return torch.sort(dropped, dim=1, descending=True, stable=True).indices[:, : n - kept.shape[1]]


def _assign(unit: Tensor, members: Tensor, targets: Tensor) -> Tensor:
    """For each of ``members`` ``[B, M]``, the position in ``targets`` ``[B, T]`` of its most similar one."""
    d = unit.shape[-1]
    m = unit.gather(1, members[..., None].expand(*members.shape, d))
    t = unit.gather(1, targets[..., None].expand(*targets.shape, d))
    return torch.einsum("bmd,btd->bmt", m, t).argmax(-1)  # argmax: first maximum, the lower index


def _average_into(tokens: Tensor, targets: Tensor, members: Tensor, owner: Tensor) -> Tensor:
    """``[B, T, d]``: each target's token averaged with the member tokens assigned to it."""
    b, _, d = tokens.shape
    sums = tokens.gather(1, targets[..., None].expand(*targets.shape, d)).clone()
    counts = torch.ones(targets.shape, dtype=tokens.dtype, device=tokens.device)
    if members.shape[1]:
        member_tokens = tokens.gather(1, members[..., None].expand(*members.shape, d))
        sums.scatter_add_(1, owner[..., None].expand(*owner.shape, d), member_tokens)
        counts.scatter_add_(1, owner, torch.ones(owner.shape, dtype=tokens.dtype, device=tokens.device))
    return sums / counts[..., None]


class Contextual(Merger):
    """VisionZip's contextual tokens: the dropped tokens merged into ``share`` of the budget."""

    name = "contextual"
    aliases = ("visionzip_contextual",)
    description = "VisionZip: merge dropped tokens into contextual tokens (uniform targets, cosine assignment)"

    @dataclass
    class Params:
        share: float = 0.15625
        """Share of the budget made of merged tokens (VisionZip: 10 of 64, 20 of 128, 30 of 192)."""

        def __post_init__(self) -> None:
            check_range("share", self.share, low=0.0, high=1.0)

    def slots(self, k: int, n: int) -> int:
        if k >= n:
            return 0
        return min(max(int(self.params.share * k + 0.5), 0), k - 1, n - k)

    def merge(self, tokens: Tensor, kept: Tensor, slots: int, scores: Mapping[str, Tensor],
              context: PruneContext) -> tuple[Tensor, Tensor]:
        b, n, d = tokens.shape
        dropped = _dropped(n, kept)
        if slots == 0:
            return kept, tokens.gather(1, kept[..., None].expand(*kept.shape, d))
        rest = dropped.shape[1]
        step = max(1, rest // slots)
        picked = set(range(0, rest, step)[:slots])  # positions among the dropped, known on the host
        targets = dropped[:, sorted(picked)]
        members = dropped[:, [i for i in range(rest) if i not in picked]]
        unit = torch.nn.functional.normalize(tokens, dim=-1)
        owner = _assign(unit, members, targets)
        merged = _average_into(tokens, targets, members, owner)
        indices = torch.cat([kept, targets], dim=1)
        features = torch.cat([tokens.gather(1, kept[..., None].expand(*kept.shape, d)), merged], dim=1)
        order = indices.argsort(dim=1)
        return indices.gather(1, order), features.gather(1, order[..., None].expand(b, indices.shape[1], d))


class Nearest(Merger):
    """PruMerge-style: each dropped token averaged into its most similar kept token."""

    name = "nearest"
    aliases = ("prumerge",)
    description = "average each dropped token into its most similar kept token (PruMerge-style)"

    def merge(self, tokens: Tensor, kept: Tensor, slots: int, scores: Mapping[str, Tensor],
              context: PruneContext) -> tuple[Tensor, Tensor]:
        n = tokens.shape[1]
        dropped = _dropped(n, kept)
        unit = torch.nn.functional.normalize(tokens, dim=-1)
        owner = _assign(unit, dropped, kept)
        return kept, _average_into(tokens, kept, dropped, owner)


@hookimpl
def resprune_register_mergers(register):
    register(Contextual)
    register(Nearest)
