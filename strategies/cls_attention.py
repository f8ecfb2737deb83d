"""Vision-tower CLS attention, as supplied by the backbone (FasterVLM / VisionZip / HiRED signal)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.errors import InvalidInputError
from resprune.interfaces import Scorer


class ClsAttention(Scorer):
    """CLS->patch attention of each token (mean over heads), from the context."""

    name = "cls_attention"
    output = "cls_attention"
    description = "vision-encoder CLS->patch attention (CLIP towers)"
    requires = frozenset({"cls_attention"})

    @dataclass
    class Params:
        layer: int | None = None
        """Vision-encoder layer whose attention is read: `null` the layer that makes the
        features (`vision_feature_layer`), or an encoder layer index (0 the first, -1 the last),
        as HiRED reads layer 0 to split its budget."""

        def __post_init__(self) -> None:
            if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
                raise ValueError(f"layer={self.layer!r} must be null or an int")

    def __init__(self, params: Mapping[str, Any] | Any | None = None, /, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        if self.params.layer is not None:
            self.requires = frozenset({"cls_attention_layers"})

    def score(self, context: PruneContext) -> Tensor:
        layer = self.params.layer
        if layer is None:
            att = context.get("cls_attention", requester="scorer 'cls_attention'")
            return torch.as_tensor(att, device=context.tokens.device).float().reshape(context.batch_size, -1)
        every = context.get("cls_attention_layers", requester="scorer 'cls_attention'")
        depth = every.shape[-1]
        if not -depth <= layer < depth:
            raise InvalidInputError(f"scorer 'cls_attention': layer={layer} is outside the vision tower's "
                                    f"{depth} encoder layers (0..{depth - 1}, or -1..-{depth}).")
        return torch.as_tensor(every[..., layer], device=context.tokens.device).float()


@hookimpl
def resprune_register_scorers(register):
    register(ClsAttention)
