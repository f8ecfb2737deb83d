"""Top-k by one named score (text relevance: the paper's Setting-3; CLS attention: FasterVLM)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.interfaces import Selector
from resprune.params import check_choice


class TopK(Selector):
    """Keep the ``k`` tokens with the highest score; ties go to the lower index."""

    name = "topk"
    description = "top-k by a named score (relevance, cls_attention, norm, ...)"

    @dataclass
    class Params:
        score: str = "relevance"
        """Name of the score to rank by; it must be present."""
        count: str = "budget"
        """`budget`: the stage's budget; `iqr`: each image keeps its outliers, the scores above
        Q3 + 1.5 IQR (PruMerge's and TRIM's adaptive count), at most the budget and at least one."""

        def __post_init__(self) -> None:
            if not self.score:
                raise ValueError("score must name a score")
            check_choice("count", self.count, ("budget", "iqr"))

    def required_scores(self) -> frozenset[str]:
        return frozenset({self.params.score})

    @property
    def adaptive(self) -> bool:
        return self.params.count == "iqr"

    def count(self, scores: Mapping[str, Tensor], context: PruneContext) -> list[int]:
        out = []
        for row in scores[self.params.score].detach().float().cpu().numpy():
            q1, q3 = np.percentile(row, 25), np.percentile(row, 75)  # as PruMerge and TRIM compute them
            outliers = int((row > q3 + 1.5 * (q3 - q1)).sum())
            out.append(int(len(row) * (outliers / len(row))))  # their int(N * ratio)
        return out

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        return torch.sort(scores[self.params.score], dim=-1, descending=True, stable=True).indices[:, :k]


@hookimpl
def resprune_register_selectors(register):
    register(TopK)
