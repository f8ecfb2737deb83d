"""Scores read from the LLM itself, for stages inside it (``layer: K``).

They need the fields an in-LLM stage offers (``resprune.llm_pruning.LLM_FIELDS``): the
attention the prompt pays to each visual token at layer ``K-1`` (FastV) or at ``K`` (PyramidDrop), the
keys' norms (DART's pivots), and the similarity of each hidden state to the last prompt
token's. None of them turns off SDPA: attention rows are recomputed for the queries that
are needed only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.interfaces import Scorer
from resprune.params import check_choice


class LLMAttention(Scorer):
    """Attention paid to each visual token at layer K-1 (FastV) or at layer K itself
    (PyramidDrop), mean over heads."""

    name = "llm_attention"
    output = "llm_attention"
    description = "LLM attention from the last or the instruction tokens, at layer K-1 (FastV) or K (PDrop)"
    requires = frozenset({"llm_attention"})

    @dataclass
    class Params:
        query: str = "last"
        """`last`: the last prompt token's attention row (FastV, PyramidDrop); `instruction`: the
        mean row of the instruction tokens (those after the row's last visual token); `raters`:
        the mean row of SparseVLM's text raters, the instruction tokens whose softmax over the
        instruction of the visual tokens' input embeddings, averaged over them, is above its
        mean (chosen once per call)."""
        layer: str = "previous"
        """`previous`: layer K-1's attention, as that layer ran (FastV); `current`: layer K's own,
        from its query and key projections of the hidden states entering it, before it runs
        (PyramidDrop; one extra key projection of the sequence)."""

        def __post_init__(self) -> None:
            check_choice("query", self.query, ("last", "instruction", "raters"))
            check_choice("layer", self.layer, ("previous", "current"))

    def __init__(self, params: Mapping[str, Any] | Any | None = None, /, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.field = "llm_attention" if self.params.layer == "previous" else "llm_own_attention"
        self.requires = frozenset({self.field})

    def score(self, context: PruneContext) -> Tensor:
        return context.get(self.field, requester=f"scorer '{self.name}'")(self.params.query)


class KeyNorm(Scorer):
    """Norm of each visual token's key at layer K-1 (heads concatenated; RoPE keeps the norm)."""

    name = "key_norm"
    output = "key_norm"
    description = "norm of the LLM keys at layer K-1 (DART's pivot criterion)"
    requires = frozenset({"llm_keys"})

    @dataclass
    class Params:
        p: int = 1
        """1 (DART's L1 norm) or 2."""

        def __post_init__(self) -> None:
            if self.p not in (1, 2) or isinstance(self.p, bool):
                raise ValueError(f"p={self.p!r} must be 1 (L1, DART) or 2 (L2).")

    def score(self, context: PruneContext) -> Tensor:
        keys = context.get("llm_keys", requester=f"scorer '{self.name}'")
        return keys.norm(p=self.params.p, dim=-1)


class HiddenSimilarity(Scorer):
    """Cosine similarity of each visual hidden state to the last prompt token's (entering layer K)."""

    name = "hidden_similarity"
    output = "hidden_similarity"
    description = "cosine similarity of visual hidden states to the last prompt token's"
    requires = frozenset({"llm_last_hidden"})

    def score(self, context: PruneContext) -> Tensor:
        last = context.get("llm_last_hidden", requester=f"scorer '{self.name}'")
        return torch.nn.functional.cosine_similarity(context.tokens, last[:, None, :], dim=-1)


@hookimpl
def resprune_register_scorers(register):
    register(LLMAttention)
    register(KeyNorm)
    register(HiddenSimilarity)
