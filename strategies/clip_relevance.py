"""Relevance of each patch to the question in CLIP's joint space (CDPruner, TRIM).

The patches' features entering the projector go through the vision tower's final layer norm
and CLIP's ``visual_projection``; the question (answer-format phrases stripped) through CLIP's
text tower with projection. The score is their cosine (CDPruner) or dot product (TRIM),
negated as both official codes do for LLaVA's CLIP, averaged over the question's 77-token
chunks (CDPruner) and optionally soft-maxed over the patches (TRIM).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.clip_text import load_clip_text
from resprune.context import PruneContext
from resprune.errors import ConfigError
from resprune.interfaces import Scorer
from resprune.linalg import unit_rows
from resprune.params import check_choice
from resprune.text import ANSWER_FORMAT_PATTERNS, strip_format


class ClipRelevance(Scorer):
    """Patch-to-question relevance in CLIP's joint space, from a CLIP text tower beside the model."""

    name = "clip_relevance"
    output = "clip_relevance"
    description = "CLIP text-to-patch relevance (CDPruner: negated cosine; TRIM: softmax of the negated dot product)"
    requires = frozenset({"vision_features", "vision_post_norm", "text"})

    @dataclass
    class Params:
        clip_model: str = "auto"
        """The CLIP checkpoint the vision tower comes from, for its text tower and visual projection:
        a local folder or hub id, or `auto`: the one the backbone names by its tower's sizes
        (LLaVA-1.5 and LLaVA-NeXT: `openai/clip-vit-large-patch14-336`; resprune's tiny models: a
        tiny CLIP)."""
        similarity: str = "cosine"
        """`cosine` (CDPruner) or `dot` (TRIM: the projections as they come)."""
        negate: bool = True
        """Negate the similarity, as both official codes do for LLaVA's CLIP (their authors find the
        text-to-patch similarity inverted there)."""
        softmax: bool = False
        """Softmax over the image's patches (TRIM)."""
        text: str = "chunks"
        """`chunks`: the whole question in 77-token chunks, the score averaged over them (CDPruner);
        `truncate`: the question cut at the context length (TRIM)."""
        strip: list[str] = field(default_factory=lambda: list(ANSWER_FORMAT_PATTERNS))
        """Answer-format phrases removed from the question first (the official codes pass the raw question)."""

        def __post_init__(self) -> None:
            if not self.clip_model:
                raise ValueError("clip_model must be 'auto', a local folder or a hub id")
            check_choice("similarity", self.similarity, ("cosine", "dot"))
            check_choice("text", self.text, ("chunks", "truncate"))

    def __init__(self, params: Mapping[str, Any] | Any | None = None, /, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        if self.params.clip_model == "auto":
            self.requires = self.requires | {"clip_checkpoint"}

    def score(self, context: PruneContext) -> Tensor:
        who = f"scorer '{self.name}'"
        spec = self.params.clip_model
        if spec == "auto":
            spec = context.get("clip_checkpoint", requester=who)
            if not spec:
                raise ConfigError(f"{who}: clip_model: auto does not know the CLIP checkpoint of this vision tower; "
                                  f"name it, e.g. scorers.0.params.clip_model=openai/clip-vit-large-patch14-336.")
        features = context.get("vision_features", requester=who).float()
        clip = load_clip_text(spec).to(features.device)
        patches = clip.project(context.get("vision_post_norm", requester=who)(features))  # [B, N, P]
        texts = [strip_format(t, self.params.strip) for t in context.texts(requester=who)]
        if self.params.text == "chunks":
            text = [clip.embed_chunks(t) for t in texts]  # [M, P] each
        else:
            text = list(clip.embed_truncated(texts)[:, None])  # [1, P] each
        out = []
        for row, embeds in enumerate(text):
            image = patches[row]
            if self.params.similarity == "cosine":
                image, embeds = unit_rows(image), unit_rows(embeds)
            similarity = image @ embeds.to(image.device).T  # [N, M]
            if self.params.negate:
                similarity = -similarity
            score = similarity.mean(dim=-1)
            out.append(score.softmax(dim=-1) if self.params.softmax else score)
        return torch.stack(out)


@hookimpl
def resprune_register_scorers(register):
    register(ClipRelevance)
