"""ToMe (ICLR'23): bipartite soft matching inside the ViT blocks.

Follows ``tome/merge.py`` and ``tome/patch/timm.py`` of the official code
(facebookresearch/ToMe @ af95e4b). In every block, between the attention and the MLP: the
tokens are split alternately into sets A (even places, the CLS token among them, never
merged) and B (odd places); each A token's best edge is its highest cosine similarity to a B
token, on the block's keys averaged over heads; the ``r`` A tokens with the best edges are
merged into their B token by a size-weighted average (sizes add up); the sequence becomes the
unmerged A tokens (in place order) followed by every B token. With proportional attention the
following blocks add ``log(size)`` to their attention logits.

At a stage inside the vision tower (``vision_layer: K``) that runs in blocks K up to the one
whose output the LLM reads, with ``r`` per block chosen so that the stage's budget is what the
tower outputs. As a plain selector (before the LLM, at an LLM layer) the same matching runs in
rounds on the stage's tokens (their cosine, merged features averaged by size) until ``k``
groups are left, and the tokens that carry them are kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.interfaces import BlockMerging, Selector
from resprune.linalg import unit_rows
from resprune.params import check_choice

__all__ = ["ToMe", "bipartite_matching", "merge_by_size"]


def bipartite_matching(metric: Tensor, r: int, protect_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's matching of A (even places) to B (odd places) on ``metric`` ``[T, S, c]``.

    Returns ``(unmerged, sources, targets)``: indices into A of the tokens kept (ascending with
    ``protect_first``, else by descending best edge, as the official code leaves them), of the
    ``r`` merged ones, and into B of where each of those goes. ``protect_first``: the token at
    place 0 (CLS) is never merged.
    """
    unit = unit_rows(metric)
    a, b = unit[:, ::2], unit[:, 1::2]
    similarity = a @ b.transpose(-1, -2)
    if protect_first:
        similarity[:, 0, :] = -torch.inf
    best, partner = similarity.max(dim=-1)
    edges = best.argsort(dim=-1, descending=True)  # the official call (same tie order)
    unmerged = edges[:, r:].sort(dim=-1).values if protect_first else edges[:, r:]  # as the official code
    sources = edges[:, :r]
    return unmerged, sources, partner.gather(1, sources)


def merge_by_size(x: Tensor, size: Tensor, unmerged: Tensor, sources: Tensor,
                  targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge the A tokens ``sources`` into the B tokens ``targets`` by size-weighted average.

    Returns ``(x, size, source)`` in ToMe's order: the unmerged A tokens, then every B token;
    ``source`` is each output token's place in the input sequence.
    """
    def step(values: Tensor) -> Tensor:
        width = values.shape[-1]
        a, b = values[:, ::2], values[:, 1::2]
        keep = a.gather(1, unmerged[..., None].expand(-1, -1, width))
        moved = a.gather(1, sources[..., None].expand(-1, -1, width))
        b = b.scatter_reduce(1, targets[..., None].expand(-1, -1, width), moved, reduce="sum")
        return torch.cat([keep, b], dim=1)

    total = step(x * size)
    size = step(size)
    places = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    source = torch.cat([places[:, ::2].gather(1, unmerged), places[:, 1::2]], dim=1)
    return total / size, size, source


class ToMe(BlockMerging, Selector):
    """ToMe: bipartite soft matching in the ViT blocks (official code), or in rounds on a stage's tokens."""

    name = "tome"
    description = "ToMe (official): bipartite soft matching inside the ViT blocks, size-weighted, proportional attention"

    @dataclass
    class Params:
        proportional_attention: bool = True
        """Add `log(size)` to the attention logits of the blocks after a merge (the official
        default for off-the-shelf models)."""
        sequence: str = "tome"
        """The order the tower's tokens reach the LLM in: `tome`, ToMe's sequence (unmerged A
        tokens, then B; the official order); `places`, each at the place of the B or unmerged A
        token it grew from, in raster order. The blocks always run on ToMe's sequence (its
        alternate split depends on it)."""

        def __post_init__(self) -> None:
            check_choice("sequence", self.sequence, ("tome", "places"))

    @property
    def proportional_attention(self) -> bool:
        return bool(self.params.proportional_attention)

    @property
    def sequence_order(self) -> bool:
        return self.params.sequence == "tome"

    def block_merge(self, hidden: Tensor, keys: Tensor, r: int, size: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            unmerged, sources, targets = bipartite_matching(keys, r, protect_first=True)
        return merge_by_size(hidden, size, unmerged, sources, targets)

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        x = tokens
        size = torch.ones_like(x[..., :1])
        carriers = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        while x.shape[1] > k:
            r = min(x.shape[1] - k, x.shape[1] // 2)
            unmerged, sources, targets = bipartite_matching(x, r, protect_first=False)
            x, size, source = merge_by_size(x, size, unmerged, sources, targets)
            carriers = carriers.gather(1, source)
        return carriers


@hookimpl
def resprune_register_selectors(register):
    register(ToMe)
