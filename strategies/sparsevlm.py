"""SparseVLM's token recycling (ICML'25): the best dropped tokens clustered and merged back.

Follows ``modelling_sparse_llama.py`` and ``utils.py`` (``cluster_and_merge``) of the official
code (Gumpest/SparseVLMs @ 535f8ba, the release before SparseVLM+): of the ``d`` visual tokens
a layer drops, the ``int(0.3 d) + 1`` with the highest rater attention are clustered into
``int(m / 10) + 1`` groups by density-peak clustering (DPC-KNN: local density from the ``c``
nearest neighbours, distance to the nearest denser token, centres by density x distance;
every token joins its nearest centre) and each group's mean is one more visual token, placed
after the kept ones. The recycled tokens come **on top of** the layer's count, as in the
official code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.interfaces import Merger
from resprune.params import check_choice, check_range

__all__ = ["Recycle", "density_peak_merge"]


def density_peak_merge(x: Tensor, clusters: int) -> tuple[Tensor, Tensor]:
    """SparseVLM's ``cluster_and_merge``: ``x`` ``[B, m, C]`` into ``clusters`` means.

    Returns ``(merged [B, clusters, C], centres [B, clusters])``, the centres (indices into
    ``x``) in descending density x distance, as the merged tokens are ordered. Density ties go
    to the lower index, where the official code adds uniform noise of 1e-6: ties are common
    (mutual nearest neighbours have equal densities with 2 clusters), so its clusters are
    random there and these are one of its outcomes.
    """
    b, m, c = x.shape
    distance = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / c ** 0.5  # exact: 0 to itself
    nearest = distance.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()  # [B, m]
    order = torch.arange(m, device=x.device)
    denser = (density[:, None, :] > density[:, :, None]) | (  # j is denser than i; ties: the lower index
        (density[:, None, :] == density[:, :, None]) & (order[None, None, :] < order[None, :, None]))
    far = distance.flatten(1).max(dim=-1).values[:, None, None]
    parent_distance = torch.where(denser, distance, far).min(dim=-1).values
    centres = (parent_distance * density).topk(clusters, dim=-1).indices  # [B, clusters]
    owner = distance.gather(1, centres[..., None].expand(b, clusters, m)).argmin(dim=1)  # [B, m]
    owner.scatter_(1, centres, torch.arange(clusters, device=x.device).expand(b, clusters))  # centres own themselves
    sums = torch.zeros(b, clusters, c, dtype=x.dtype, device=x.device).scatter_add_(
        1, owner[..., None].expand(b, m, c), x)
    sizes = torch.zeros(b, clusters, dtype=x.dtype, device=x.device).scatter_add_(1, owner, torch.ones_like(x[..., 0]))
    return sums / (sizes[..., None] + 1e-6), centres


class Recycle(Merger):
    """SparseVLM's recycling: the best-scored dropped tokens clustered into extra tokens (official code)."""

    name = "recycle"
    description = "SparseVLM (official): the top 30 % of dropped tokens by score, DPC-KNN clustered, added on top"

    @dataclass
    class Params:
        score: str = "llm_attention"
        """The score that ranks the dropped tokens (SparseVLM: the raters' attention)."""
        share: float = 0.3
        """Share of the dropped tokens recycled: `int(share * dropped) + 1` of them."""
        per_cluster: int = 10
        """Recycled tokens per merged token: `int(recycled / per_cluster) + 1` clusters."""
        sequence: str = "sparsevlm"
        """`sparsevlm`: the merged tokens follow the kept ones (the official order); `places`:
        each at its cluster centre's place."""

        def __post_init__(self) -> None:
            check_range("share", self.share, low=0.0, high=1.0)
            if isinstance(self.per_cluster, bool) or not isinstance(self.per_cluster, int) or self.per_cluster < 1:
                raise ValueError(f"per_cluster={self.per_cluster!r} must be an int >= 1")
            check_choice("sequence", self.sequence, ("sparsevlm", "places"))

    def required_scores(self) -> frozenset[str]:
        return frozenset({self.params.score})

    def _recycled(self, dropped: int) -> int:
        return min(int(dropped * self.params.share) + 1, dropped)

    def extra(self, k: int, n: int) -> int:
        dropped = n - k
        return 0 if dropped <= 0 else int(self._recycled(dropped) / self.params.per_cluster) + 1

    def merge(self, tokens: Tensor, kept: Tensor, slots: int, scores: Mapping[str, Tensor],
              context: PruneContext) -> tuple[Tensor, Tensor]:
        b, n, d = tokens.shape
        own = tokens.gather(1, kept[..., None].expand(*kept.shape, d))
        if slots == 0:
            return kept, own
        score = scores[self.params.score]  # the stage checks that a scorer wrote it (required_scores)
        is_kept = torch.zeros(b, n, dtype=torch.bool, device=tokens.device).scatter_(1, kept, True)
        dropped = torch.sort((~is_kept).to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :n - kept.shape[1]]
        recycled = self._recycled(dropped.shape[1])
        best = score.float().gather(1, dropped).topk(recycled, dim=1).indices  # the official topk: by score
        members = dropped.gather(1, best)  # [B, m], in descending score
        merged, centres = density_peak_merge(tokens.gather(1, members[..., None].expand(b, recycled, d)), slots)
        places = torch.cat([kept, members.gather(1, centres)], dim=1)  # merged tokens at their centres' places
        features = torch.cat([own, merged], dim=1)
        if self.params.sequence == "sparsevlm":
            return places, features  # the official sequence: the kept tokens (ascending), then the merged ones
        order = places.argsort(dim=1)
        return places.gather(1, order), features.gather(1, order[..., None].expand(b, places.shape[1], d))


@hookimpl
def resprune_register_mergers(register):
    register(Recycle)
