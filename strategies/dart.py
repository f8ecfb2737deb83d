"""DART (duplication-aware token reduction): keep pivots, then the tokens least like them.

Pivots are the image tokens with the largest key norm at layer K-1, plus (optionally) the
instruction tokens with the largest key norm. Each pivot in turn adds its share of the
budget: the not-yet-kept visual tokens with the lowest cosine similarity to it. Text
pivots guide the choice but are not kept (they are text). Ties go to the lower index.

Inside the LLM, similarity is measured after the language model's final norm, as DART does
(``similarity: final_norm``). Deviations from the reference code: the budget is met exactly
(DART's ``128`` setting keeps 132 tokens: give ``budget: 132`` for its count), and the pivots
take their turns in a defined order (image pivots by key norm, then text pivots), where DART
iterates a Python set of absolute positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.interfaces import Selector
from resprune.params import check_choice


class Dart(Selector):
    """Pivots by key norm, then per pivot the least similar tokens (DART, EMNLP'25)."""

    name = "dart"
    description = "DART: key-norm pivots + the tokens least similar to them (in-LLM, layer 2)"

    @dataclass
    class Params:
        image_pivots: int = 4
        """Image tokens with the largest `score` kept as pivots (DART: 4)."""
        text_pivots: int = 4
        """Instruction tokens with the largest key norm used as pivots, not kept (DART: 4); 0 for none
        or outside the LLM."""
        score: str = "key_norm"
        """The score that ranks image pivots."""
        similarity: str = "final_norm"
        """`final_norm`: cosine similarity after the language model's final norm where the stage
        has it (inside the LLM; DART's choice), else on the tokens; `hidden`: on the tokens."""

        def __post_init__(self) -> None:
            for field in ("image_pivots", "text_pivots"):
                value = getattr(self, field)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"{field}={value!r} must be an int >= 0.")
            if self.image_pivots + self.text_pivots < 1:
                raise ValueError("image_pivots + text_pivots must be >= 1.")
            if not self.score:
                raise ValueError("score must name a score")
            check_choice("similarity", self.similarity, ("final_norm", "hidden"))

    def required_scores(self) -> frozenset[str]:
        return frozenset({self.params.score})

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        b, n, _ = tokens.shape
        rank = torch.sort(scores[self.params.score], dim=-1, descending=True, stable=True).indices
        p_img = min(self.params.image_pivots, k)
        pivots = rank[:, :p_img]
        if p_img == k:
            return pivots
        norm = context.maybe("llm_final_norm") if self.params.similarity == "final_norm" else None
        space = (lambda x: x) if norm is None else norm
        unit = torch.nn.functional.normalize(space(tokens), dim=-1)
        vectors = [unit.gather(1, pivots[..., None].expand(b, p_img, unit.shape[-1]))]
        text = context.maybe("llm_text_hidden") if self.params.text_pivots else None
        if text is not None and text.shape[1]:
            norms = context.get("llm_text_key_norm")  # [B, T], -inf on padding
            t = min(self.params.text_pivots, text.shape[1])
            top = torch.sort(norms, dim=-1, descending=True, stable=True).indices[:, :t]
            chosen = text.gather(1, top[..., None].expand(b, t, text.shape[-1]))
            vectors.append(torch.nn.functional.normalize(space(chosen), dim=-1))
        pivot_vecs = torch.cat(vectors, dim=1)  # [B, P, d]
        sims = torch.einsum("bpd,bnd->bpn", pivot_vecs, unit)  # [B, P, N]
        taken = torch.zeros(b, n, dtype=torch.bool, device=tokens.device).scatter_(1, pivots, True)
        picks = [pivots]
        need, count = k - p_img, pivot_vecs.shape[1]
        quotas = [need // count + (1 if j < need % count else 0) for j in range(count)]
        for j, quota in enumerate(quotas):
            if quota == 0:
                continue
            sim = sims[:, j].masked_fill(taken, float("inf"))
            pick = torch.sort(sim, dim=-1, stable=True).indices[:, :quota]
            taken.scatter_(1, pick, True)
            picks.append(pick)
        return torch.cat(picks, dim=1)


@hookimpl
def resprune_register_selectors(register):
    register(Dart)
