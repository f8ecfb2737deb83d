"""Top-k by one named score (text relevance: the paper's Setting-3; CLS attention: FasterVLM)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.interfaces import Selector


class TopK(Selector):
    """Keep the ``k`` tokens with the highest score; ties go to the lower index."""

    name = "topk"
    description = "top-k by a named score (relevance, cls_attention, norm, ...)"

    @dataclass
    class Params:
        score: str = "relevance"
        """Name of the score to rank by; it must be present."""

        def __post_init__(self) -> None:
            if not self.score:
                raise ValueError("score must name a score")

    def required_scores(self) -> frozenset[str]:
        return frozenset({self.params.score})

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        return torch.sort(scores[self.params.score], dim=-1, descending=True, stable=True).indices[:, :k]


@hookimpl
def resprune_register_selectors(register):
    register(TopK)
