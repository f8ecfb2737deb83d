"""CLS->patch attention of a CLIP vision tower, without switching it to eager attention.

Forward hooks on a layer's query and key projections take the CLS query and every key as the
tower computes them; the CLS row of the attention matrix follows: ``softmax(q_cls k^T *
scale)``, averaged over heads. That is one row of the matrix, not the ``S x S`` eager
attention, so the tower keeps running on SDPA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from resprune.errors import IncompatibleBackboneError

__all__ = ["ClsAttentionProbe", "LastLayerProbe", "cls_attention_row", "feature_layer_index"]


def cls_attention_row(attn: Any, query: Tensor, keys: Tensor) -> Tensor:
    """``softmax(q_cls k^T * scale)`` averaged over heads, ``[B, S]``, from the CLS query
    projection ``[B, 1, C]`` and the key projections ``[B, S, C]`` of the CLIP attention ``attn``."""
    b, s, _ = keys.shape
    heads, dh = attn.num_heads, attn.head_dim
    q = query.float().view(b, 1, heads, dh).transpose(1, 2)  # [B, H, 1, dh]
    k = keys.float().view(b, s, heads, dh).transpose(1, 2)  # [B, H, S, dh]
    logits = (q @ k.transpose(-1, -2)) * attn.scale  # [B, H, 1, S]
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


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
    """Context manager that records CLS->token attention at CLIP encoder layers.

    Forward hooks on each recorded layer's ``q_proj`` and ``k_proj`` keep the CLS query and
    turn the keys into the CLS row of the attention matrix: ``softmax(q_cls k^T * scale)``,
    averaged over heads. The tower's own projections are reused (nothing is recomputed) and
    it keeps running on SDPA.

    After the tower ran inside the block, ``attention`` is ``[images, S]`` at the feature layer
    (``S`` = sequence length including the CLS token itself at column 0), and ``layers``
    ``[images, L, S]`` at every encoder layer when ``every_layer`` is set. With ``keys``,
    ``keys`` is the feature layer's keys averaged over heads ``[images, S, head_dim]`` and
    ``cls_hidden`` the CLS token's output of the feature layer ``[images, C]`` (VisionZip).

    Another tower names its pieces: ``layers`` (the encoder layers), ``attention`` (each layer's
    attention module) and the modules whose outputs are the query and the key (``query``, ``key``;
    InternViT: ``layer``, ``attention``, ``q_norm``, ``k_norm``, after its query/key norms).
    """

    def __init__(self, vision_tower: Any, vision_feature_layer: int | list[int], *, every_layer: bool = False,
                 keys: bool = False, layers: Any = None, attention: str = "self_attn", query: str = "q_proj",
                 key: str = "k_proj") -> None:
        if layers is None:
            try:
                layers = getattr(vision_tower, "vision_model", vision_tower).encoder.layers
            except AttributeError:
                raise IncompatibleBackboneError(
                    f"cls_attention needs a CLIP-style vision tower (encoder.layers); "
                    f"{type(vision_tower).__name__} has none.") from None
        self.feature_layer = feature_layer_index(vision_feature_layer, len(layers))
        wanted = range(len(layers)) if every_layer else (self.feature_layer,)
        self.modules = {i: getattr(layers[i], attention) for i in wanted}
        self._taps = (query, key)
        self.feature_block = layers[self.feature_layer] if keys else None
        self.keys: Tensor | None = None
        self.cls_hidden: Tensor | None = None
        self.rows: dict[int, Tensor] = {}
        self._queries: dict[int, Tensor] = {}
        self._handles: list[Any] = []

    @property
    def attention(self) -> Tensor | None:
        return self.rows.get(self.feature_layer)

    @property
    def layers(self) -> Tensor | None:
        if len(self.rows) != len(self.modules) or len(self.modules) == 1:
            return None
        return torch.stack([self.rows[i] for i in sorted(self.rows)], dim=1)

    def _query(self, index: int) -> Any:
        def hook(module: Any, args: Any, output: Tensor) -> None:
            self._queries[index] = output[:, :1].detach()

        return hook

    def _key(self, index: int) -> Any:
        attn = self.modules[index]

        def hook(module: Any, args: Any, output: Tensor) -> None:
            with torch.no_grad():
                self.rows[index] = cls_attention_row(attn, self._queries.pop(index), output)  # [B, S]
                if index == self.feature_layer and self.feature_block is not None:
                    b, s, _ = output.shape
                    self.keys = output.detach().view(b, s, attn.num_heads, attn.head_dim).mean(dim=2)  # [B, S, dh]

        return hook

    def _block_output(self, module: Any, args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        self.cls_hidden = hidden[:, 0].detach()

    def __enter__(self) -> ClsAttentionProbe:
        query, key = self._taps
        for index, attn in self.modules.items():
            self._handles.append(getattr(attn, query).register_forward_hook(self._query(index)))
            self._handles.append(getattr(attn, key).register_forward_hook(self._key(index)))
        if self.feature_block is not None:
            self._handles.append(self.feature_block.register_forward_hook(self._block_output))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._queries.clear()


class LastLayerProbe:
    """Context manager that records the last encoder layer's keys and its CLS attention the way
    PruMerge computes it: one head over the concatenated heads, ``softmax(q_cls k^T / sqrt(C))``.

    After the tower ran: ``keys`` ``[tiles, S, C]`` (the key projections, heads concatenated)
    and ``attention`` ``[tiles, S]`` (CLS column included).
    """

    def __init__(self, vision_tower: Any) -> None:
        layers = getattr(vision_tower, "vision_model", vision_tower).encoder.layers
        self.attn = layers[len(layers) - 1].self_attn
        self.layer = len(layers) - 1
        self.keys: Tensor | None = None
        self.attention: Tensor | None = None
        self._query: Tensor | None = None
        self._handles: list[Any] = []

    def _on_query(self, module: Any, args: Any, output: Tensor) -> None:
        self._query = output[:, :1].detach()

    def _on_key(self, module: Any, args: Any, output: Tensor) -> None:
        with torch.no_grad():
            keys = output.detach().float()
            logits = (self._query.float() @ keys.transpose(1, 2))[:, 0] * keys.shape[-1] ** -0.5
            self.attention = logits.softmax(dim=-1)
            self.keys = keys

    def __enter__(self) -> LastLayerProbe:
        self._handles = [self.attn.q_proj.register_forward_hook(self._on_query),
                         self.attn.k_proj.register_forward_hook(self._on_key)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
