"""Seeded random selection: the floor every method must beat."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.interfaces import Selector


class RandomSelector(Selector):
    """``k`` tokens drawn uniformly without replacement.

    The draw depends only on ``seed`` and ``N``: an image gets the same tokens whatever
    the batch it is in and whatever the device.
    """

    name = "random"
    description = "seeded uniform random subset"

    @dataclass
    class Params:
        seed: int = 0
        """Seed of the CPU generator used for the draw (the same tokens on every device)."""

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        b, n, _ = tokens.shape
        gen = torch.Generator().manual_seed(self.params.seed)
        picks = torch.randperm(n, generator=gen)[:k]
        return picks.to(tokens.device).expand(b, k).contiguous()


@hookimpl
def resprune_register_selectors(register):
    register(RandomSelector)
