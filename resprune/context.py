"""PruneContext: what scorers and selectors may read about a batch of images.

Only ``tokens`` is always there. Everything else (instruction text, a text embedder,
vision-tower CLS attention, the spatial grid) is supplied by the backbone or the caller,
either as a value or as a zero-argument callable that is run the first time a strategy
asks for it, so expensive context is computed only on request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import InvalidInputError, MissingContextError

__all__ = ["PruneContext", "CONTEXT_FIELDS"]

CONTEXT_FIELDS: dict[str, str] = {
    "tokens": "visual tokens in LLM input-embedding space, float32 [B, N, d]",
    "text": "the instruction of each image, list of B strings",
    "text_embedder": "callable str -> [L, d] sub-word embeddings in the tokens' space",
    "cls_attention": "vision-tower CLS->patch attention per token, [B, N]",
    "cls_attention_layers": "vision-tower CLS->patch attention per token at every encoder layer, [B, N, L] "
                            "(CLIP towers; index l = encoder layer l)",
    "vision_features": "the vision tower's features that enter the projector, per token, [B, N, C] "
                       "(CLIP towers; zeros at LLaVA-NeXT newline tokens)",
    "vision_keys": "the vision tower's keys at the feature layer, mean over heads, per token, [B, N, head_dim] "
                   "(CLIP towers; VisionZip's similarity)",
    "vision_cls": "the CLS token's feature at the feature layer, before the projector, [B, C] (CLIP towers; "
                  "LLaVA-NeXT: the base image's)",
    "projector": "callable [..., C] -> [..., D]: the model's projector from vision features to LLM tokens",
    "last_keys": "the vision tower's last-layer keys, heads concatenated, per token, [B, N, C] (CLIP towers; "
                 "PruMerge's similarity)",
    "last_cls_attention": "the last layer's CLS attention as PruMerge computes it (one head over the concatenated "
                          "heads, per tile), per token, [B, N, 1] (CLIP towers)",
    "clip_checkpoint": "the CLIP checkpoint the vision tower comes from (str or None; CLIP towers), for a CLIP text "
                       "tower beside it",
    "vision_post_norm": "callable [..., C] -> [..., C]: the vision tower's final layer norm (CLIP towers; what CLIP's "
                        "visual projection reads)",
    "tiles": "the tile of each token, int [N]: 0 the base image, 1.. the crops in raster order, -1 none "
             "(LLaVA-NeXT newlines)",
    "frames": "the frame of each token of a video (its temporal patch), int [N], 0, 1, ... in time order "
              "(videos only)",
    "frame_attention": "a video token's share of its frame's attention-pooling (SigLIP MAP head) attention, pooled "
                       "like the tokens, [B, N] (LLaVA-OneVision videos; FastVID)",
    "frame_features": "the pooled feature of each token's frame (the SigLIP MAP head's output), [B, N, C] "
                      "(LLaVA-OneVision videos; FastVID)",
    "grid": "(rows, cols) when the N tokens form one raster-ordered grid",
    "positions": "token centres as (row, col) in grid units, [N, 2]; NaN for non-spatial tokens",
}
"""The standard context fields. Backbones may offer more under other names (in-LLM stages:
``resprune.llm_pruning.LLM_FIELDS``)."""

CALLABLE_FIELDS = frozenset({"text_embedder", "llm_attention", "llm_own_attention", "llm_final_norm", "projector",
                             "vision_post_norm"})
"""Fields whose value is itself a callable (any other callable is a provider run on first use)."""


class PruneContext:
    """Lazily evaluated context for one batch of equal-length token sequences.

    Args:
        tokens: ``[B, N, d]`` (or ``[N, d]``) visual tokens.
        source: who built the context (a backbone name), used in error messages.
        **fields: context values, or zero-argument callables computing them on first use.
    """

    def __init__(self, tokens: Tensor, *, source: str = "caller", **fields: Any) -> None:
        if tokens.dim() == 2:
            tokens = tokens.unsqueeze(0)
        self.tokens = tokens
        self.source = source
        self._values: dict[str, Any] = {"tokens": tokens}
        self._providers: dict[str, Callable[[], Any]] = {}
        for name, value in fields.items():
            if value is None:
                continue
            if callable(value) and name not in CALLABLE_FIELDS:
                self._providers[name] = value
            else:
                self._values[name] = value
        if "positions" not in self and "grid" in self:
            self._providers["positions"] = self._positions_from_grid

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def available(self) -> frozenset[str]:
        """Names of the fields this context can supply."""
        return frozenset(self._values) | frozenset(self._providers)

    def __contains__(self, name: object) -> bool:
        return name in self._values or name in self._providers

    def get(self, name: str, *, requester: str = "a strategy") -> Any:
        """Return field ``name``, computing it on first use.

        Raises:
            MissingContextError: the field was not supplied; names the requester and what
                is available.
        """
        if name in self._values:
            return self._values[name]
        provider = self._providers.get(name)
        if provider is None:
            raise MissingContextError(
                f"{requester} needs context '{name}' ({CONTEXT_FIELDS.get(name, 'non-standard field')}), "
                f"which {self.source} did not supply. Available: {', '.join(sorted(self.available))}."
            )
        value = provider()
        self._values[name] = value
        return value

    def maybe(self, name: str, default: Any = None) -> Any:
        """Return field ``name`` if it can be supplied, else ``default``."""
        return self.get(name) if name in self else default

    def check(self, names: Sequence[str] | frozenset[str], *, requester: str) -> None:
        """Raise ``MissingContextError`` up front if any of ``names`` is missing."""
        missing = sorted(n for n in names if n not in self)
        if missing:
            self.get(missing[0], requester=requester)

    def texts(self, *, requester: str = "a strategy") -> list[str]:
        """The ``text`` field as a list of exactly ``B`` strings."""
        text = self.get("text", requester=requester)
        texts = [text] * self.batch_size if isinstance(text, str) else list(text)
        if len(texts) != self.batch_size or not all(isinstance(t, str) for t in texts):
            raise InvalidInputError(
                f"context 'text' from {self.source} must be a string or {self.batch_size} strings "
                f"(one per image), got {len(texts)} items."
            )
        return texts

    def _positions_from_grid(self) -> Tensor:
        rows, cols = self.get("grid")
        if rows * cols != self.num_tokens:
            raise InvalidInputError(
                f"context 'grid'={tuple(self.get('grid'))} from {self.source} has {rows * cols} cells "
                f"but there are N={self.num_tokens} tokens."
            )
        r = torch.arange(rows, dtype=torch.float32).repeat_interleave(cols)
        c = torch.arange(cols, dtype=torch.float32).repeat(rows)
        return torch.stack([r, c], dim=1).to(self.tokens.device)

    def __repr__(self) -> str:
        return (f"PruneContext(B={self.batch_size}, N={self.num_tokens}, d={self.tokens.shape[-1]}, "
                f"source={self.source!r}, fields={sorted(self.available)})")

