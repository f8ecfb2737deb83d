"""Theoretical costs of a prefill: FLOPs (the paper's Eq. 18) and KV-cache bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["LLMDims", "llm_dims", "prefill_flops", "kv_cache_bytes"]


@dataclass(frozen=True)
class LLMDims:
    """The LLM sizes the cost formulas need."""

    hidden: int
    intermediate: int
    layers: int
    kv_heads: int
    head_dim: int


def llm_dims(config: Any) -> LLMDims:
    """Read the language model's sizes from a model config (or its ``text_config``)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    return LLMDims(
        hidden=hidden,
        intermediate=int(text.intermediate_size),
        layers=int(text.num_hidden_layers),
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or hidden // heads),
    )


def prefill_flops(dims: LLMDims | Any, tokens: int) -> float:
    """Eq. 18 summed over layers: ``L * (8 T d^2 + 4 T^2 d + 6 T d m)`` for ``T`` tokens.

    ``T`` counts every token of the prompt (visual and text); pass a model config or
    ``LLMDims``.
    """
    dims = dims if isinstance(dims, LLMDims) else llm_dims(dims)
    t, d, m = float(tokens), float(dims.hidden), float(dims.intermediate)
    return dims.layers * (8 * t * d * d + 4 * t * t * d + 6 * t * d * m)


def kv_cache_bytes(dims: LLMDims | Any, tokens: int, bytes_per_value: int = 2) -> int:
    """Keys and values of ``tokens`` positions over all layers (``bytes_per_value`` 2 = bf16)."""
    dims = dims if isinstance(dims, LLMDims) else llm_dims(dims)
    return 2 * dims.layers * dims.kv_heads * dims.head_dim * int(tokens) * bytes_per_value
