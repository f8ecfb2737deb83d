"""Theoretical costs of a prefill: FLOPs (the paper's Eq. 18) and KV-cache bytes.

Token counts are an int (every layer sees that many tokens) or a **schedule** of
``(first layer, tokens)`` pairs for pipelines with stages inside the LLM, e.g.
``[(0, 650), (2, 330)]``: layers 0-1 run on 650 tokens, layers 2.. on 330 (Eq. 18 summed
layer by layer; the KV cache of each layer holds what that layer saw).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LLMDims", "LinearAttentionDims", "Tokens", "llm_dims", "vision_dims", "layer_tokens", "prefill_flops", "vision_flops",
           "kv_cache_bytes"]

Tokens = int | Sequence[tuple[int, int]]
"""Prompt tokens: one count for every layer, or ``(first layer, tokens)`` pairs."""


@dataclass(frozen=True)
class LinearAttentionDims:
    """The sizes of a Gated DeltaNet layer (Qwen3.5's linear attention)."""

    key_heads: int
    value_heads: int
    key_dim: int  # per head
    value_dim: int  # per head
    conv_kernel: int

    def flops_per_token(self, hidden: int) -> float:
        """One token through the layer's token mixer (Eq. 18's convention: 2 FLOPs per multiply-add):
        the input projections (queries, keys, values, output gate, the ``a`` and ``b`` of the decay
        and write strength) and the output projection ``2 d (2 K + 3 V + 2 h_v)``, the short causal
        convolution ``2 k_conv (2 K + V)`` and the recurrent state update ``8 h_v d_k d_v`` (decay,
        read, write and query of each value head's ``d_k x d_v`` state), with ``K = h_k d_k`` and
        ``V = h_v d_v``. Linear in the tokens: nothing grows like Eq. 18's ``T^2``."""
        keys, values = self.key_heads * self.key_dim, self.value_heads * self.value_dim
        project = 2 * hidden * (2 * keys + 3 * values + 2 * self.value_heads)
        conv = 2 * self.conv_kernel * (2 * keys + values)
        state = 8 * self.value_heads * self.key_dim * self.value_dim
        return float(project + conv + state)


@dataclass(frozen=True)
class LLMDims:
    """The LLM sizes the cost formulas need."""

    hidden: int
    intermediate: int
    layers: int
    kv_heads: int
    head_dim: int
    windows: tuple[int | None, ...] = ()
    """Per layer, the sliding window of a sliding-attention layer (Gemma 3's local layers), or
    ``None`` for full attention; empty: every layer is full attention."""
    linear: tuple[bool, ...] = ()
    """Per layer, whether it is a linear-attention layer (Qwen3.5's Gated DeltaNet); empty: none."""
    linear_attention: LinearAttentionDims | None = None
    """The sizes of those layers."""

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if layer < len(self.windows) else None

    def is_linear(self, layer: int) -> bool:
        return layer < len(self.linear) and self.linear[layer]


def llm_dims(config: Any) -> LLMDims:
    """Read the language model's sizes from a model config (or its ``text_config``)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    types = getattr(text, "layer_types", None) or ()
    window = getattr(text, "sliding_window", None)
    windows = tuple(int(window) if kind == "sliding_attention" and window else None for kind in types)
    linear = tuple(kind == "linear_attention" for kind in types)
    linear_attention = LinearAttentionDims(
        key_heads=int(text.linear_num_key_heads), value_heads=int(text.linear_num_value_heads),
        key_dim=int(text.linear_key_head_dim), value_dim=int(text.linear_value_head_dim),
        conv_kernel=int(text.linear_conv_kernel_dim)) if any(linear) else None
    return LLMDims(
        hidden=hidden,
        intermediate=int(text.intermediate_size),
        layers=int(text.num_hidden_layers),
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or hidden // heads),
        windows=windows if any(w is not None for w in windows) else (),
        linear=linear if any(linear) else (),
        linear_attention=linear_attention,
    )


def layer_tokens(layers: int, tokens: Tokens) -> list[int]:
    """The prompt tokens each of ``layers`` layers runs on."""
    if isinstance(tokens, (int, float)):
        return [int(tokens)] * layers
    pairs = sorted((int(first), int(count)) for first, count in tokens)
    if not pairs or pairs[0][0] != 0:
        raise ValueError(f"a token schedule starts at layer 0, got {pairs}")
    out = []
    for layer in range(layers):
        out.append([count for first, count in pairs if first <= layer][-1])
    return out


def prefill_flops(dims: LLMDims | Any, tokens: Tokens) -> float:
    """Eq. 18 summed over layers: ``sum_l (8 T_l d^2 + 4 T_l A_l d + 6 T_l d m)``.

    ``T_l`` counts every token of the prompt (visual and text) that layer ``l`` runs on:
    ``tokens`` is one count for all layers or a ``(first layer, tokens)`` schedule. ``A_l``, the
    keys a query attends to, is ``T_l`` (the paper's ``T^2`` term), or at most the window ``W``
    of a sliding-attention layer (``min(T_l, W)``). A linear-attention layer (Qwen3.5) costs
    ``T_l`` times its token mixer's per-token FLOPs (``LinearAttentionDims.flops_per_token``) plus
    the same MLP term ``6 T_l d m``. Pass a model config or ``LLMDims``.
    """
    dims = dims if isinstance(dims, LLMDims) else llm_dims(dims)
    d, m = float(dims.hidden), float(dims.intermediate)
    total = 0.0
    for layer, t in enumerate(map(float, layer_tokens(dims.layers, tokens))):
        if dims.is_linear(layer) and dims.linear_attention is not None:
            total += t * dims.linear_attention.flops_per_token(dims.hidden) + 6 * t * d * m
            continue
        window = dims.window(layer)
        keys = t if window is None else min(t, float(window))
        total += 8 * t * d * d + 4 * t * keys * d + 6 * t * d * m
    return total


def kv_cache_bytes(dims: LLMDims | Any, tokens: Tokens, bytes_per_value: int = 2) -> int:
    """Keys and values of the prompt over all layers (``bytes_per_value`` 2 = bf16); with a
    schedule each layer holds the tokens it ran on, a sliding-attention layer at most its window,
    a linear-attention layer none (its recurrent state has one size whatever the prompt)."""
    dims = dims if isinstance(dims, LLMDims) else llm_dims(dims)
    per_token = 2 * dims.kv_heads * dims.head_dim * bytes_per_value
    held = [0 if dims.is_linear(layer) else t if dims.window(layer) is None else min(t, dims.window(layer))
            for layer, t in enumerate(layer_tokens(dims.layers, tokens))]
    return per_token * sum(held)


def vision_dims(config: Any) -> LLMDims:
    """The vision tower's sizes from a model config (its ``vision_config``)."""
    vision = getattr(config, "vision_config", config)
    hidden = int(vision.hidden_size)
    heads = int(getattr(vision, "num_attention_heads", None) or vision.num_heads)  # Qwen2.5-VL: num_heads
    layers = int(getattr(vision, "num_hidden_layers", None) or vision.depth)  # Qwen2.5-VL: depth
    return LLMDims(hidden=hidden, intermediate=int(vision.intermediate_size), layers=layers,
                   kv_heads=heads, head_dim=hidden // heads)


def vision_flops(dims: LLMDims | Any, tokens: Tokens, tiles: int = 1) -> float:
    """A ViT's forward, layer by layer: ``sum_l tiles (8 t_l d^2 + 4 t_l^2 d + 4 t_l d m)``.

    ``tokens`` counts the tokens of all ``tiles`` together (one count, or a ``(first encoder
    layer, tokens)`` schedule from stages inside the tower); each tile attends within itself
    (``t_l`` = tokens / tiles) and its MLP has two matrices. Pass a model config or
    ``vision_dims``.
    """
    dims = dims if isinstance(dims, LLMDims) else vision_dims(dims)
    if tiles < 1:
        raise ValueError(f"tiles={tiles}: a vision tower runs on at least one tile")
    d, m = float(dims.hidden), float(dims.intermediate)
    per_tile = [t / tiles for t in map(float, layer_tokens(dims.layers, tokens))]
    return sum(tiles * (8 * t * d * d + 4 * t * t * d + 4 * t * d * m) for t in per_tile)
