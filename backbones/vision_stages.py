"""Stages inside a CLIP vision tower: pruning patch tokens between two encoder blocks.

A stage at ``vision_layer=K`` acts on the tower's ``hidden_states[K]`` (the input of encoder
layer K; 0: the embeddings), counted like the ``hidden_states`` the LLaVA models read their
features from. The CLS token (index 0) is protected; the stage's selector (and merger) run on
the patch tokens of every tile as one batch, so every tile keeps the same count and the blocks
after K run on the shorter sequence with the tower's own attention (SDPA, no mask needed).

A stage whose selector merges inside the blocks (``BlockMerging``: ToMe) runs in every block
from K up to the one whose output the LLM reads, between the block's attention and its MLP,
with the ``r`` per block that meets the stage's budget and, when the selector asks for it,
``log(size)`` added to the attention logits of the blocks after a merge.

The tokens a stage drops never reach the projector. Its output is put back at the places of
the tokens that survived (zeros at the dropped ones; the surviving places filled in the
tower's sequence order, which is raster order unless a block merger reorders) so the
backbone's own packing (LLaVA-NeXT's unpadding and row newlines) runs unchanged; ``masks`` say
which tokens are still there after each stage, and the injector leaves the others out before
anything else sees them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from resprune.context import PruneContext
from resprune.errors import BudgetError, ConfigError, IncompatibleBackboneError
from resprune.interfaces import BlockMerging
from resprune.stages import Stage

from .clip_attention import cls_attention_row

__all__ = ["VISION_FIELDS", "TowerStages", "hidden_index"]

_MISSING = object()

VISION_FIELDS = frozenset({"tokens", "grid", "positions", "cls_attention"})
"""What a stage inside a CLIP tower can read: the patch tokens (the residual stream entering
layer K), their grid or positions, and the CLS attention of the block that produced them."""


def hidden_index(layer: int, depth: int) -> int:
    """``hidden_states[layer]`` of a tower with ``depth`` encoder layers, as a non-negative index."""
    return layer if layer >= 0 else depth + 1 + layer


class TowerStages:
    """Context manager that runs a pipeline's vision stages inside one call of a CLIP tower.

    Args:
        tower: the vision tower (``CLIPVisionModel``; ``vision_model.encoder.layers``).
        projector: the module the selected features enter; its output is put back at the
            tokens' original places.
        stages: the pipeline's vision stages, at increasing ``vision_layer``.
        feature_layers: the ``hidden_states`` indices the features are read from.
        strategy: ``"default"`` (CLS dropped before the projector) or ``"full"``.
        source: who runs the stages, for error messages.

    After the call: ``masks`` (bool ``[tiles, S']`` per stage, ``S'`` the projector's tokens per
    tile), ``schedule`` (``(first encoder layer, tokens summed over tiles)`` pairs) and
    ``expand(x, layer)`` for per-token values recorded at ``hidden_states[layer]``.
    """

    def __init__(self, tower: Any, projector: Any, stages: Sequence[Stage], feature_layers: Sequence[int],
                 strategy: str, *, source: str) -> None:
        layers = vision_layers(tower)
        depth = len(layers)
        if not hasattr(getattr(getattr(tower, "vision_model", tower), "embeddings", None), "class_embedding"):
            raise IncompatibleBackboneError(f"{source}: stages inside the vision tower protect its CLS token, and "
                                            f"{type(tower).__name__} has none.")
        last = min(hidden_index(f, depth) for f in feature_layers)
        for stage in stages:
            if stage.vision_layer > last:
                raise ConfigError(
                    f"{stage.where} stage: the LLM reads the tower's features from hidden_states[{last}] (the tower "
                    f"has {depth} layers); a stage inside the tower acts at vision_layer 0..{last}.")
            if "cls_attention" in stage.requires and stage.vision_layer == 0:
                raise ConfigError(f"{stage.where} stage: cls_attention comes from the block before the stage; at "
                                  f"vision_layer 0 (the embeddings) there is none. Use vision_layer >= 1.")
        merging = [s for s in stages if isinstance(s.selector, BlockMerging)]
        if merging:
            stage = merging[0]
            if stage is not stages[-1]:
                raise ConfigError(f"{stage.where} stage: selector '{stage.selector.name}' merges in every block up to "
                                  f"the features; it must be the last stage inside the tower.")
            if stage.vision_layer >= last:
                raise ConfigError(f"{stage.where} stage: selector '{stage.selector.name}' merges inside blocks "
                                  f"{stage.vision_layer}..{last - 1}, which is none; use vision_layer 0..{last - 1}.")
        self.layers = layers
        self.merging = (merging[0], range(merging[0].vision_layer, last)) if merging else None
        self.projector = projector
        self.stages = list(stages)
        self.strategy = strategy
        self.source = source
        self.masks: list[Tensor] = []
        self.schedule: list[tuple[int, int]] = []
        self._alive: list[tuple[int, Tensor]] = []  # (layer, [tiles, S_K] indices into the full sequence)
        self._length = 0
        self._cls: dict[int, Tensor] = {}
        self._queries: dict[int, Tensor] = {}
        self._handles: list[Any] = []
        self._forwards: list[tuple[Any, Any]] = []  # (block, its own forward attribute) a block merger replaced
        self._keys: dict[int, Tensor] = {}
        self._size: Tensor | None = None
        self._r: list[int] = []

    # --- hooks --------------------------------------------------------------------------

    def __enter__(self) -> TowerStages:
        for stage in self.stages:
            k = stage.vision_layer
            if self.merging is not None and stage is self.merging[0]:
                for index in self.merging[1]:
                    block = self.layers[index]
                    self._forwards.append((block, block.__dict__.get("forward", _MISSING)))  # e.g. accelerate's
                    block.forward = self._merging_forward(stage, index, block)  # an instance attribute
                    self._handles.append(block.self_attn.k_proj.register_forward_hook(self._block_keys(index)))
                continue
            if k == 0:
                self._handles.append(self.layers[0].register_forward_pre_hook(self._before(stage)))
            else:
                # prepend: the tower's own hidden_states recorder (a forward hook) sees the pruned output
                self._handles.append(self.layers[k - 1].register_forward_hook(self._after(stage), prepend=True))
                if "cls_attention" in stage.requires:
                    attn = self.layers[k - 1].self_attn
                    self._handles.append(attn.q_proj.register_forward_hook(self._query(k)))
                    self._handles.append(attn.k_proj.register_forward_hook(self._key(k, attn)))
        if self.stages:
            self._handles.append(self.projector.register_forward_hook(self._projected))
        return self

    def __exit__(self, *exc: object) -> None:
        for block, saved in self._forwards:
            if saved is _MISSING:
                block.__dict__.pop("forward", None)
            else:
                block.__dict__["forward"] = saved
        self._forwards.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._keys.clear()
        self._queries.clear()
        self._cls.clear()

    def _before(self, stage: Stage) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (self._prune(stage, args[0]), *args[1:])

        return hook

    def _after(self, stage: Stage) -> Any:
        def hook(module: Any, args: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (self._prune(stage, output[0]), *output[1:])
            return self._prune(stage, output)

        return hook

    def _query(self, k: int) -> Any:
        def hook(module: Any, args: Any, output: Tensor) -> None:
            self._queries[k] = output[:, :1].detach()

        return hook

    def _key(self, k: int, attn: Any) -> Any:
        def hook(module: Any, args: Any, output: Tensor) -> None:
            with torch.no_grad():
                self._cls[k] = cls_attention_row(attn, self._queries.pop(k), output)

        return hook

    def _block_keys(self, index: int) -> Any:
        def hook(module: Any, args: Any, output: Tensor) -> None:
            self._keys[index] = output.detach()

        return hook

    def _merging_forward(self, stage: Stage, index: int, block: Any) -> Any:
        """A CLIP encoder block's forward with the stage's merge between attention and MLP."""
        merger: Any = stage.selector
        attn = block.self_attn
        blocks = self.merging[1] if self.merging is not None else range(0)

        def forward(hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
            if index == blocks.start:
                self._start_merging(stage, hidden_states, len(blocks))
            residual = hidden_states
            hidden = block.layer_norm1(hidden_states)
            if merger.proportional_attention and self._size is not None:
                bias = self._size.log()[:, None, None, :, 0].to(hidden.dtype)  # [T, 1, 1, S]
                attention_mask = bias if attention_mask is None else attention_mask + bias
            hidden, _ = attn(hidden_states=hidden, attention_mask=attention_mask, **kwargs)
            hidden = residual + hidden
            r = self._r[index - blocks.start]
            if r:
                tiles, length, _ = hidden.shape
                keys = self._keys.pop(index).view(tiles, length, attn.num_heads, attn.head_dim).mean(dim=2)
                size = self._size if self._size is not None else hidden.new_ones(tiles, length, 1)
                hidden, self._size, source = merger.block_merge(hidden, keys, r, size)
                alive = self.alive_at(index, tiles, hidden.device)
                self._alive.append((index + 1, alive.gather(1, source.to(alive.device))))
                self.schedule.append((index + 1, tiles * hidden.shape[1]))
            if index == blocks.stop - 1:
                self.masks.append(self._mask(self.alive_at(index + 1, hidden.shape[0], hidden.device)))
            residual = hidden
            return residual + block.mlp(block.layer_norm2(hidden))

        return forward

    def _start_merging(self, stage: Stage, hidden: Tensor, blocks: int) -> None:
        tiles, length, _ = hidden.shape
        if not self._alive:
            self._length = length
            self.schedule = [(0, tiles * length)]
        patches = length - 1
        k = stage.budget_for(patches)
        self._r = _merge_schedule(patches, k, blocks)
        self._size = None
        left = length
        for i, r in enumerate(self._r):
            if r > (left - 1) // 2:
                raise BudgetError(
                    f"{stage.where} stage: selector '{stage.selector.name}' keeps {k} of {patches} patch tokens over "
                    f"{blocks} blocks, {r} in block {stage.vision_layer + i}, but a block can merge at most half of "
                    f"its {left - 1} patch tokens ({(left - 1) // 2}); raise the budget or start at an earlier layer.")
            left -= r

    def _projected(self, module: Any, args: Any, output: Tensor) -> Tensor:
        return self.expand(output, self.vision_layer_of_features, projected=True)

    # --- pruning ------------------------------------------------------------------------

    @property
    def vision_layer_of_features(self) -> int:
        return len(self.layers)  # every stage acts at or before the feature layer: the last map applies

    def _prune(self, stage: Stage, hidden: Tensor) -> Tensor:
        tiles, length, width = hidden.shape
        if not self._alive:
            self._length = length
            self.schedule = [(0, tiles * length)]
        alive = self.alive_at(stage.vision_layer, tiles, hidden.device)
        patches = alive[:, 1:] - 1  # each patch token's index in the full patch grid
        side = math.isqrt(self._length - 1)
        square = side * side == self._length - 1
        fields: dict[str, Any] = {}
        if square and length == self._length:
            fields["grid"] = (side, side)
        elif square and bool((patches == patches[:1]).all()):  # every tile kept the same places
            fields["positions"] = torch.stack([patches[0] // side, patches[0] % side], dim=1).float()
        cls = self._cls.pop(stage.vision_layer, None)
        if cls is not None:
            fields["cls_attention"] = cls[:, 1:]
        with torch.no_grad():
            context = PruneContext(hidden[:, 1:].float(), source=f"{self.source} ({stage.where})", **fields)
            sel = stage.run(context)
        kept = sel.kept.to(hidden.device)
        if sel.features is not None:
            kept_tokens = sel.features.to(hidden.dtype)
        else:
            kept_tokens = hidden[:, 1:].gather(1, kept.unsqueeze(-1).expand(-1, -1, width))
        alive = torch.cat([alive[:, :1], alive[:, 1:].gather(1, sel.held.to(alive.device))], dim=1)
        self._alive.append((stage.vision_layer, alive))
        self.schedule.append((stage.vision_layer, tiles * alive.shape[1]))
        self.masks.append(self._mask(alive))
        return torch.cat([hidden[:, :1], kept_tokens], dim=1)

    def alive_at(self, layer: int, tiles: int = 0, device: Any = None) -> Tensor:
        """``[tiles, S_layer]``: the full-sequence index of each token of ``hidden_states[layer]``."""
        for at, alive in reversed(self._alive):
            if at <= layer:
                return alive
        return torch.arange(self._length, device=device).expand(tiles, self._length)

    def _places(self, alive: Tensor, projected: bool) -> tuple[Tensor, int]:
        """Where the tokens go among the ``S`` tokens (or the projector's ``S'``, CLS dropped under
        ``default``) per tile: the surviving places, ascending, filled in the tower's sequence
        order (or each token at its own place, when a block merger asks for that)."""
        places, size = (alive[:, 1:] - 1, self._length - 1) if projected and self.strategy == "default" \
            else (alive, self._length)
        if self.merging is not None and not self.merging[0].selector.sequence_order:
            return places, size
        return places.sort(dim=1).values, size

    def _mask(self, alive: Tensor) -> Tensor:
        places, size = self._places(alive, projected=True)
        return torch.zeros(alive.shape[0], size, dtype=torch.bool, device=alive.device).scatter_(1, places, True)

    def expand(self, values: Tensor, layer: int, *, projected: bool = False) -> Tensor:
        """``values`` ``[tiles, S_layer, ...]`` of the tokens of ``hidden_states[layer]`` (or of the
        projector's tokens with ``projected``) put back at their places in the full sequence, zeros
        at the tokens pruned before."""
        if not self._alive or self._alive[0][0] > layer:
            return values
        places, size = self._places(self.alive_at(layer), projected)
        places = places.to(values.device)
        out = values.new_zeros(values.shape[0], size, *values.shape[2:])
        index = places.view(*places.shape, *([1] * (values.dim() - 2))).expand_as(values)
        return out.scatter(1, index, values)


def _merge_schedule(tokens: int, budget: int, blocks: int) -> list[int]:
    """``r`` of each of ``blocks`` blocks removing ``tokens - budget`` in all: an even split, the
    first blocks taking one more when it does not divide."""
    base, extra = divmod(max(tokens - budget, 0), blocks)
    return [base + (1 if i < extra else 0) for i in range(blocks)]


def vision_layers(tower: Any) -> Any:
    """The encoder blocks of a CLIP-style tower (``vision_model.encoder.layers``)."""
    try:
        return getattr(tower, "vision_model", tower).encoder.layers
    except AttributeError:
        raise IncompatibleBackboneError(
            f"stages inside the vision tower need a CLIP-style tower (encoder.layers); "
            f"{type(tower).__name__} has none.") from None
