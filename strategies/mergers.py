"""Mergers: the dropped tokens live on in tokens within the budget.

* ``contextual`` (VisionZip): ``slots`` targets taken at a uniform stride from the dropped
  tokens; every other dropped token joins the target it is most cosine-similar to; each
  target becomes the mean of itself and its members and takes the target's place.
* ``nearest`` (PruMerge-style): no extra tokens; each dropped token is averaged into the
  kept token it is most similar to.
* ``visionzip``: VisionZip as its official code runs it, before the projector on a CLIP tower:
  the CLS token and contextual tokens made from the vision features, grouped by the keys.

``contextual`` and ``nearest`` measure similarity on the stage's tokens (projector outputs
before the LLM, hidden states inside it), so they work at any stage and on any backbone.
Ties go to the lower index.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.interfaces import Merger
from resprune.linalg import unit_rows
from resprune.params import check_choice, check_range


def _dropped(n: int, kept: Tensor) -> Tensor:
    """``[B, N - k]`` the indices not in ``kept``, ascending (a stable sort: no host read, so a
    merger inside the LLM does not wait for the device)."""
    b = kept.shape[0]
    dropped = torch.ones(b, n, dtype=torch.uint8, device=kept.device).scatter_(1, kept, 0)
    return torch.sort(dropped, dim=1, descending=True, stable=True).indices[:, : n - kept.shape[1]]


def _uniform_targets(dropped: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """VisionZip's targets: ``count`` of the dropped tokens ``[B, R]`` at the stride
    ``max(1, R // count)``, and the rest (members), both in order (positions known on the host)."""
    rest = dropped.shape[1]
    picked = set(range(0, rest, max(1, rest // count))[:count]) if count else set()
    return dropped[:, sorted(picked)], dropped[:, [i for i in range(rest) if i not in picked]]


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
        targets, members = _uniform_targets(dropped, slots)
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
    description = "average each dropped token into its most similar kept token (PruMerge-style)"

    def merge(self, tokens: Tensor, kept: Tensor, slots: int, scores: Mapping[str, Tensor],
              context: PruneContext) -> tuple[Tensor, Tensor]:
        n = tokens.shape[1]
        dropped = _dropped(n, kept)
        unit = torch.nn.functional.normalize(tokens, dim=-1)
        owner = _assign(unit, dropped, kept)
        return kept, _average_into(tokens, kept, dropped, owner)


class VisionZip(Merger):
    """VisionZip's CLS and contextual tokens, made before the projector (official code).

    Follows ``CLIPVisionTower_VisionZip.forward`` (dvlab-research/VisionZip @ 3151f6d): of the
    dropped patches (in order), ``C`` targets at the stride ``max(1, R // C)``; every other one
    joins the target whose key (the feature layer's keys averaged over heads, L2-normalised) is
    most similar; a contextual token is ``target + mean(members)`` of the vision features, then
    projected. The CLS token's feature takes one more slot. With ``sequence: visionzip`` the
    image's tokens reach the LLM in VisionZip's order: CLS, the kept tokens, the contextual ones.
    """

    name = "visionzip"
    description = "VisionZip (official): CLS + contextual tokens from CLIP features grouped by keys, pre-projector"
    requires = frozenset({"vision_features", "vision_keys", "vision_cls", "projector"})

    @dataclass
    class Params:
        share: float = 0.15625
        """Share of the budget made of contextual tokens (VisionZip: 10 of 64, 20 of 128, 30 of 192)."""
        cls: bool = True
        """The CLS token takes one slot (VisionZip's dominant tokens include it: 53 patches + CLS + 10)."""
        sequence: str = "visionzip"
        """`visionzip`: the tokens reach the LLM as VisionZip orders them (CLS, kept tokens, contextual
        ones; on LLaVA only the order matters); `places`: each at its carrier's place (the CLS at the
        first dropped patch that carries no contextual token)."""

        def __post_init__(self) -> None:
            check_range("share", self.share, low=0.0, high=1.0)
            check_choice("sequence", self.sequence, ("visionzip", "places"))

    def __init__(self, params: Mapping[str, Any] | Any | None = None, /, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        if not self.params.cls:
            self.requires = frozenset({"vision_features", "vision_keys", "projector"})

    def slots(self, k: int, n: int) -> int:
        if k >= n:
            return 0
        return min(max(int(self.params.share * k + 0.5), 0) + int(self.params.cls), k - 1, n - k)

    def merge(self, tokens: Tensor, kept: Tensor, slots: int, scores: Mapping[str, Tensor],
              context: PruneContext) -> tuple[Tensor, Tensor]:
        b, n, d = tokens.shape
        dropped = _dropped(n, kept)
        own = tokens.gather(1, kept[..., None].expand(*kept.shape, d))
        if slots == 0:
            return kept, own
        who = f"merger '{self.name}'"
        vision = context.get("vision_features", requester=who).float()
        project = context.get("projector", requester=who)
        with_cls = bool(self.params.cls)
        count = slots - int(with_cls)
        targets, members = _uniform_targets(dropped, count)
        parts, carriers = [], []
        if with_cls:  # its place: the first dropped patch carrying no contextual token
            parts.append(project(context.get("vision_cls", requester=who).float())[:, None])
            carriers.append(members[:, :1])
        parts.append(own)
        if count:
            keys = context.get("vision_keys", requester=who).float()
            owner = _assign(unit_rows(keys), members, targets)  # the CLS carrier's own patch is merged like any other
            c = vision.shape[-1]
            sums = torch.zeros(b, count, c, device=vision.device)
            sums.scatter_add_(1, owner[..., None].expand(*owner.shape, c),
                              vision.gather(1, members[..., None].expand(*members.shape, c)))
            sizes = torch.zeros(b, count, device=vision.device).scatter_add_(
                1, owner, torch.ones(owner.shape, device=vision.device)).clamp_min(1)
            contextual = vision.gather(1, targets[..., None].expand(*targets.shape, c)) + sums / sizes[..., None]
            parts.append(project(contextual))
            carriers.append(targets)
        features = torch.cat(parts, dim=1)  # VisionZip's sequence: CLS, kept (ascending), contextual
        places = torch.cat([kept] + carriers if not with_cls else [carriers[0], kept] + carriers[1:], dim=1)
        if self.params.sequence == "visionzip":
            return places, features  # the tokens enter the sequence in this order
        order = places.argsort(dim=1)
        return places.gather(1, order), features.gather(1, order[..., None].expand(b, places.shape[1], d))


class RestMean(Merger):
    """TRIM's aggregated token: the mean of every token the selector left out (official code).

    Follows ``CLIPVisionTower.token_reduction`` (``TextSim+``) of FreedomIntelligence/TRIM @
    0e66677: the vision features entering the projector of the tokens not selected are
    averaged, and the projector makes one more token of the mean, after the kept ones.
    """

    name = "rest_mean"
    description = "TRIM (official): one token, the projected mean of the unselected vision features, after the kept ones"
    requires = frozenset({"vision_features", "projector"})

    @dataclass
    class Params:
        on_top: bool = True
        """The token comes on top of the budget (TRIM keeps its count plus one); `false`: it is one of
        the budget's tokens."""
        features: str = "vision_features"
        """What is averaged: `vision_features` (before the projector, then projected, as TRIM does) or
        `tokens` (the stage's own tokens, e.g. inside the LLM)."""

        def __post_init__(self) -> None:
            check_choice("features", self.features, ("vision_features", "tokens"))

    def __init__(self, params: Mapping[str, Any] | Any | None = None, /, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        if self.params.features == "tokens":
            self.requires = frozenset()

    def slots(self, k: int, n: int) -> int:
        return 0 if self.params.on_top or k >= n or k < 2 else 1

    def extra(self, k: int, n: int) -> int:
        return 1 if self.params.on_top and k < n else 0

    def merge(self, tokens: Tensor, kept: Tensor, slots: int, scores: Mapping[str, Tensor],
              context: PruneContext) -> tuple[Tensor, Tensor]:
        b, n, d = tokens.shape
        own = tokens.gather(1, kept[..., None].expand(*kept.shape, d))
        if slots == 0:
            return kept, own
        dropped = _dropped(n, kept)  # [B, n - k], ascending
        who = f"merger '{self.name}'"
        if self.params.features == "tokens":
            mean = tokens.gather(1, dropped[..., None].expand(*dropped.shape, d)).mean(dim=1)
        else:
            vision = context.get("vision_features", requester=who).float()
            c = vision.shape[-1]
            mean = context.get("projector", requester=who)(
                vision.gather(1, dropped[..., None].expand(*dropped.shape, c)).mean(dim=1))
        # its place: the first token left out; it enters the sequence after the kept ones (TRIM's order)
        return torch.cat([kept, dropped[:, :1]], dim=1), torch.cat([own, mean[:, None]], dim=1)


@hookimpl
def resprune_register_mergers(register):
    register(Contextual)
    register(Nearest)
    register(VisionZip)
    register(RestMean)
