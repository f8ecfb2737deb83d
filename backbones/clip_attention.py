"""CLS->patch attention of a CLIP vision tower, without switching it to eager attention.

A forward pre-hook on the feature layer's self-attention captures its (normalised) input;
the CLS query row of the attention matrix is then recomputed from the layer's own q/k
projections: ``softmax(q_cls k^T * scale)``, averaged over heads. That is one row of the
matrix, not the ``S x S`` eager attention, so the tower keeps running on SDPA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from resprune.errors import IncompatibleBackboneError

__all__ = ["ClsAttentionProbe", "feature_layer_index"]


def feature_layer_index(vision_feature_layer: int | list[int], num_layers: int) -> int:
    """Encoder layer whose output is ``hidden_states[vision_feature_layer]`` (last if a list).

    ``hidden_states[0]`` is the embedding output, ``hidden_states[i]`` the output of layer
    ``i - 1``; the attention that produced the features is that layer's.
    """
    layer = vision_feature_layer[-1] if isinstance(vision_feature_layer, (list, tuple)) else vision_feature_layer
    h = layer if layer >= 0 else num_layers + 1 + layer
    if not 1 <= h <= num_layers:
        raise IncompatibleBackboneError(
            f"vision_feature_layer={vision_feature_layer} has no attention (tower has {num_layers} layers).")
    return h - 1


class ClsAttentionProbe:
    """Context manager that records CLS->token attention at one CLIP encoder layer.

    After the tower ran inside the block, ``attention`` is ``[images, S]`` (``S`` =
    sequence length including the CLS token itself at column 0).
    """

    def __init__(self, vision_tower: Any, vision_feature_layer: int | list[int]) -> None:
        try:
            layers = getattr(vision_tower, "vision_model", vision_tower).encoder.layers
        except AttributeError:
            raise IncompatibleBackboneError(
                f"cls_attention needs a CLIP-style vision tower (encoder.layers); "
                f"{type(vision_tower).__name__} has none.") from None
        self.attn = layers[feature_layer_index(vision_feature_layer, len(layers))].self_attn
        self.attention: Tensor | None = None
        self._handle: Any = None

    def _hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h = kwargs.get("hidden_states", args[0] if args else None)
        with torch.no_grad():
            b, s, _ = h.shape
            heads, dh = module.num_heads, module.head_dim
            q = module.q_proj(h[:, :1]).view(b, 1, heads, dh).transpose(1, 2)  # [B, H, 1, dh]
            k = module.k_proj(h).view(b, s, heads, dh).transpose(1, 2)  # [B, H, S, dh]
            logits = (q.float() @ k.float().transpose(-1, -2)) * module.scale  # [B, H, 1, S]
            self.attention = logits.softmax(dim=-1).mean(dim=1)[:, 0]  # [B, S]

    def __enter__(self) -> ClsAttentionProbe:
        self._handle = self.attn.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
