"""DyCoke's temporal token merging (TTM), as its official code runs it on LLaVA-OneVision.

DyCoke (Tao et al., CVPR 2025; ``KD-TAO/DyCoke``, ``llava/model/llava_arch.py``,
``dycole_ttm``, checked @ dd74634) prunes a video's tokens before the LLM in two passes over
its frames, each token compared with the token at the same place in an anchor frame:

1. frames in pairs ``(0, 1), (2, 3), ...``: the first of a pair is kept whole; of the second,
   the ``int((1 - K) * P)`` tokens least similar (cosine) to the first are kept;
2. windows of four ``(0..3), (4..7), ...``, all but the last (the official
   ``range(0, num_frames - 4, 4)``): frame ``i + 2`` is pruned the same way against frame
   ``i`` instead of being kept whole.

``K`` (``merging_ratio``) is the share of a pruned frame that goes; the README's command for
LLaVA-OneVision-7B uses 0.7 (the builder's default is 0.3). The count is DyCoke's own (the
selector is adaptive): the stage's budget only caps it, and under a smaller cap the kept
tokens go in this order: tokens after the frame grid (the newline LLaVA-OneVision appends to a
video, which DyCoke appends after pruning), the whole frames, then the pruned frames' kept
tokens from the least similar up (called directly for more, ``select`` goes on with the
dropped ones, least similar first). A video of an odd number of frames keeps its last frame whole (the
official loop drops it from the sequence). DyCoke's second part, pruning the KV cache while
decoding, is not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.interfaces import Selector
from resprune.params import check_range

from resprune.image_selection import frame_grid


def dycoke_order(tokens: Tensor, frames: Tensor, merging_ratio: float) -> tuple[Tensor, int]:
    """Every token of each image, ``[B, N]``, in DyCoke's keeping order (see the module), and its
    count: the first ``count`` are what DyCoke keeps; after them come the tokens it drops, the
    least similar to their anchor first."""
    b, n, _ = tokens.shape
    t, per = frame_grid(frames, n, "selector 'dycoke'")
    grid = t * per
    v = tokens[:, :grid].float().reshape(b, t, per, -1)
    num_keep = int((1 - merging_ratio) * per)
    anchor = {i + 1: i for i in range(0, t - 1, 2)}  # pass 1: the second of each pair against the first
    anchor.update({i + 2: i for i in range(0, t - 4, 4)})  # pass 2: frame i + 2 against frame i
    whole = [f for f in range(t) if f not in anchor]
    places = torch.arange(per, device=tokens.device)
    trailing = torch.arange(grid, n, device=tokens.device).expand(b, -1)
    kept_whole = torch.cat([f * per + places for f in whole]).expand(b, -1)
    kept, kept_sim, dropped, dropped_sim = [], [], [], []
    for f, a in sorted(anchor.items()):
        sim = torch.nn.functional.cosine_similarity(v[:, a], v[:, f], dim=-1)  # [B, P]
        least = torch.sort(sim, dim=-1, stable=True)
        index = f * per + least.indices
        kept.append(index[:, :num_keep])
        kept_sim.append(least.values[:, :num_keep])
        dropped.append(index[:, num_keep:])
        dropped_sim.append(least.values[:, num_keep:])

    def by_similarity(index: list[Tensor], sim: list[Tensor]) -> Tensor:
        if not index:
            return kept_whole[:, :0]
        index_, sim_ = torch.cat(index, dim=1), torch.cat(sim, dim=1)
        return index_.gather(1, torch.sort(sim_, dim=-1, stable=True).indices)  # the least similar first

    order = torch.cat([trailing, kept_whole, by_similarity(kept, kept_sim), by_similarity(dropped, dropped_sim)],
                      dim=1)
    return order, n - grid + per * len(whole) + num_keep * len(anchor)


class DyCoke(Selector):
    """DyCoke's TTM: whole anchor frames, and of every other frame the tokens least similar to the
    same place in its anchor (official ``dycole_ttm``); its own count."""

    name = "dycoke"
    description = "DyCoke TTM: of each non-anchor frame keep the (1-K) least similar to its anchor frame"
    requires = frozenset({"frames"})

    @dataclass
    class Params:
        merging_ratio: float = 0.7
        """``K``: the share of a pruned frame's tokens that goes (README's LLaVA-OneVision-7B
        command: 0.7)."""

        def __post_init__(self) -> None:
            check_range("merging_ratio", self.merging_ratio, low=0.0, high=1.0)

    @property
    def adaptive(self) -> bool:
        return True

    def count(self, scores: Mapping[str, Tensor], context: PruneContext) -> list[int]:
        tokens = context.tokens
        frames = torch.as_tensor(context.get("frames", requester="selector 'dycoke'")).to(tokens.device)
        _, count = dycoke_order(tokens, frames, float(self.params.merging_ratio))
        return [count] * tokens.shape[0]

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        frames = torch.as_tensor(context.get("frames", requester="selector 'dycoke'")).to(tokens.device)
        order, _ = dycoke_order(tokens, frames, float(self.params.merging_ratio))
        return order[:, :k]  # the stage asks for at most DyCoke's count; called directly, its order goes on


@hookimpl
def resprune_register_selectors(register):
    register(DyCoke)
