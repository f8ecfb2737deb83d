"""Vision-tower CLS attention, as supplied by the backbone (FasterVLM / VisionZip signal)."""

from __future__ import annotations

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.interfaces import Scorer


class ClsAttention(Scorer):
    """CLS->patch attention of each token (mean over heads), from the context."""

    name = "cls_attention"
    output = "cls_attention"
    description = "vision-encoder CLS->patch attention (CLIP towers)"
    requires = frozenset({"cls_attention"})

    def score(self, context: PruneContext) -> Tensor:
        att = context.get("cls_attention", requester="scorer 'cls_attention'")
        return torch.as_tensor(att, device=context.tokens.device).float().reshape(context.batch_size, -1)


@hookimpl
def resprune_register_scorers(register):
    register(ClsAttention)
