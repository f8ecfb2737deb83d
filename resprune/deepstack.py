"""Per-layer visual features the LLM adds after its first layers (Qwen3-VL's DeepStack), pruned.

Qwen3-VL adds features from several vision-tower layers to the hidden states of its visual
tokens after LLM decoder layers ``0, 1, ...`` (``visual_pos_masks``, ``deepstack_visual_embeds``).
It does so only when it runs the vision tower itself; an attached model gets ``inputs_embeds``,
so resprune adds them instead: forward hooks on those decoder layers add each kept token's own
features at the column the token holds when the layer returns. That is the column of the pruned
prompt, or, after a stage inside the LLM (``resprune.llm_pruning``), its column in that stage's
shorter sequence; the features of tokens a stage dropped are dropped with them. The arithmetic
is the model's own (``hidden[mask] = hidden[mask] + features``), so keep-all is bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .errors import InvalidInputError
from .llm_pruning import text_model_of

if TYPE_CHECKING:
    from .llm_pruning import LLMPruner

__all__ = ["DeepStack"]


class _Call:
    """One call's features: ``slots`` bool ``[B, L]`` marks the visual columns of the LLM input,
    ``features[j]`` ``[M, D]`` their features for layer ``j`` in row-major slot order."""

    def __init__(self, slots: Tensor, features: list[Tensor], pruner: LLMPruner | None) -> None:
        self.slots = slots.bool()
        self.features = features
        self.pruner = pruner
        self.pending = set(range(len(features)))  # layers not applied yet (prefill comes first)
        self.order: Tensor | None = None

    def fit(self, rows: int) -> None:
        """``generate`` repeats each prompt's row for beams before the prefill: follow it, once."""
        have = self.slots.shape[0]
        if rows == have:
            return
        if rows % have:
            raise InvalidInputError(f"DeepStack: the LLM got {rows} rows for {have} prompts.")
        factor = rows // have
        counts = self.slots.sum(1).tolist()
        self.features = [torch.cat([chunk for chunk in f.split(counts) for _ in range(factor)]) for f in self.features]
        self.slots = self.slots.repeat_interleave(factor, 0)
        self.order = None

    def at_current_columns(self, layer: int) -> tuple[Tensor, Tensor]:
        """``(mask [B, L_now], features [m, D])``: the visual columns of the sequence as it is now
        and the layer's features of the tokens there, in row-major order."""
        features = self.features[layer]
        state = None if self.pruner is None else self.pruner.state
        if state is None or not state.regions:  # no stage inside the LLM has shortened the sequence yet
            return self.slots, features
        if self.order is None:
            self.order = (self.slots.flatten().long().cumsum(0) - 1).view_as(self.slots)
        columns = state.columns.clamp_min(0).to(self.slots.device)  # the LLM-input column of each column
        mask = self.slots.gather(1, columns) & state.valid.to(self.slots.device)
        return mask, features[self.order.gather(1, columns)[mask].to(features.device)]


class DeepStack:
    """Adds the kept tokens' per-layer features after the first ``layers`` decoder layers, in
    prefill, while armed for a call (see the module docstring)."""

    def __init__(self, model: Any, layers: int, *, source: str) -> None:
        decoder = list(text_model_of(model).layers)
        if layers > len(decoder):
            raise InvalidInputError(f"{source}: {layers} DeepStack layers for a language model of {len(decoder)} "
                                    f"decoder layers.")
        self.layers = decoder[:layers]
        self.source = source
        self.call: _Call | None = None
        self._hooks: list[Any] = []

    def install(self) -> None:
        self._hooks = [layer.register_forward_hook(self._make_hook(i)) for i, layer in enumerate(self.layers)]

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.call = None

    def arm(self, slots: Tensor, features: list[Tensor], pruner: LLMPruner | None = None) -> None:
        """Prepare one call: ``features[j]`` ``[M, D]`` for the ``M`` visual columns ``slots`` marks
        (bool ``[B, L]`` over the LLM input, row-major), added after layer ``j``; ``pruner``: the
        call's in-LLM stages, whose shorter sequences the features follow."""
        if len(features) > len(self.layers):
            raise InvalidInputError(f"{self.source}: the images carry DeepStack features for {len(features)} layers; "
                                    f"the backbone declared {len(self.layers)}.")
        count = int(slots.sum())
        for j, f in enumerate(features):
            if f.dim() != 2 or f.shape[0] != count:
                raise InvalidInputError(f"{self.source}: DeepStack features of layer {j} have shape "
                                        f"{tuple(f.shape)}; expected [{count}, D] for the {count} visual tokens.")
        self.call = _Call(slots, features, pruner)

    def disarm(self) -> None:
        self.call = None

    def _make_hook(self, index: int) -> Callable[..., Any]:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> Any:
            call = self.call
            if call is None or index not in call.pending:
                return None
            call.pending.discard(index)
            hidden = output[0] if isinstance(output, tuple) else output
            call.fit(hidden.shape[0])
            mask, features = call.at_current_columns(index)
            mask = mask.to(hidden.device)
            features = features.to(hidden.device, hidden.dtype)
            hidden = hidden.clone()
            hidden[mask, :] = hidden[mask, :] + features
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook
