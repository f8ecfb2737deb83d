"""Pruning inside the LLM: drop visual tokens from the hidden states entering decoder layer K.

How it works (transformers 5.x decoder-only LLMs: Llama, Qwen2, Mistral, ...):

* the text model's attention implementation is swapped for a thin wrapper around the one
  it used (``sdpa`` or ``eager``), registered with both ``AttentionInterface`` and
  ``AttentionMaskInterface`` (without the mask registration transformers would silently
  drop the padding mask). At layer ``K-1`` during prefill the wrapper keeps the queries
  of the rows a scorer needs and the keys, so attention scores are one softmax row per
  query, not an ``L x L`` matrix; every layer still runs on the original kernel;
* forward pre-hooks (with kwargs) on decoder layers ``>= K``: at layer ``K`` the stage
  selects per image, and the hook gathers ``hidden_states``, ``position_embeddings`` and
  ``position_ids`` at the kept columns (original positions are kept) and gives layers
  ``>= K`` an attention mask for the shorter sequence. Their KV cache is shorter;
  ``cache.get_seq_length()`` reads layer 0, so ``generate``'s bookkeeping stays on the full
  length, and while decoding the mask of the new tokens is appended to the kept columns'.

Rows are re-padded on the left when their kept counts differ, so the last column of every
row stays its last prompt token. A stage that keeps every token changes nothing.

Hybrid LLMs (Qwen3.5: linear-attention layers, ``layer_types``) have attention weights only at
their full-attention layers: a stage reads attention only from one of them, while a stage that
reads none acts at any layer; a linear layer after a stage gets the 2-D padding mask of the
shorter rows, and its recurrent state is that of the shorter sequence.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .context import PruneContext
from .errors import IncompatibleBackboneError, InvalidInputError
from .image_selection import ImageSelection
from .selection import DeferredChecks

if TYPE_CHECKING:
    from .stages import Stage

__all__ = ["LLMPruner", "LLM_FIELDS", "LLM_STAGE_FIELDS", "Span", "StageRecord", "attention_rows", "text_model_of"]

LLM_FIELDS: dict[str, str] = {
    "tokens": "hidden states entering decoder layer K, float32 [B, N, D]",
    "llm_attention": "callable query -> [B, N]: attention the 'last' prompt token, the mean 'instruction' token or "
                     "the mean 'raters' token (SparseVLM) pays to each visual token at layer K-1, mean over heads",
    "llm_own_attention": "callable query -> [B, N]: the same paid at layer K itself, from its query and key "
                         "projections of the hidden states entering it (PyramidDrop)",
    "llm_keys": "keys of the visual tokens at layer K-1 (after RoPE), float32 [B, N, kv_heads * head_dim]",
    "llm_last_hidden": "hidden state of each row's last prompt token entering layer K, float32 [B, D]",
    "llm_final_norm": "callable [..., D] -> [..., D] float32: the language model's final norm (DART measures "
                      "similarity after it)",
    "layer": "the decoder layer K the stage acts on (int)",
    "positions": "token centres as (row, col) in grid units, [N, 2] (when the image has a grid; one for the images "
                 "pruned together, which must agree)",
    "tiles": "the tile of each token, int [N] (when the image has tiles; see resprune.context)",
    "frames": "the frame of each token of a video, int [N] (videos)",
}
"""Context fields an in-LLM stage offers its scorers and selector."""

IMAGE_FIELDS = frozenset({"tokens", "positions", "tiles", "frames"})
"""Fields of ``LLM_FIELDS`` that the input stage has as well (the others exist only inside the LLM)."""

LLM_STAGE_FIELDS = frozenset(LLM_FIELDS) | {"text"}
"""Everything a stage inside the LLM can read: ``LLM_FIELDS`` and the instruction text (when a
processor or ``text=`` supplies it)."""

_WRAPPED = ("sdpa", "eager")
LINEAR = "linear_attention"  # a layer type of hybrid LLMs (Qwen3.5's Gated DeltaNet): no attention, no KV cache
_PREFIX = "resprune_"
_active: dict[int, LLMPruner] = {}  # id(attention module) -> pruner; read by the attention wrapper
_lock = threading.Lock()


def text_model_of(model: Any) -> Any:
    """The decoder stack (``.layers``) of an LVLM's language model."""
    inner = getattr(model, "model", None)
    lm = getattr(inner, "language_model", None)
    if lm is None or not hasattr(lm, "layers"):
        raise IncompatibleBackboneError(
            f"{type(model).__name__}: no model.model.language_model.layers; in-LLM stages need a transformers "
            f"LVLM whose language model is a decoder stack (LLaVA, LLaVA-NeXT, Qwen2.5-VL).")
    return lm


# --- the attention wrapper ---------------------------------------------------------------


def _register(base: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = _PREFIX + base

    def attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  *args: Any, **kwargs: Any) -> Any:
        pruner = _active.get(id(module))
        if pruner is not None:
            pruner._capture(module, query, key, attention_mask, kwargs.get("scaling", args[1] if len(args) > 1
                                                                           else None))
        return _base_attention(module, base)(module, query, key, value, attention_mask, *args, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _base_attention(module: Any, base: str) -> Callable[..., Any]:
    if base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as eager
    return eager


# --- per-call state ------------------------------------------------------------------------


@dataclass
class Span:
    """One image's alive visual tokens in the current sequence."""

    image: int
    row: int
    n: int  # tokens of the image before any pruning
    alive: Tensor  # int64 [m] original token indices still in the sequence, in column order
    columns: Tensor  # int64 [m] their columns in the current sequence
    positions: Tensor | None = None  # [n, 2] grid positions of all n tokens
    geometry: Any = None  # the image's EncodedImage without features (for pictures)


def _geometry_fields(members: list[Span], who: str) -> dict[str, Any]:
    """``positions``, ``tiles`` and ``frames`` of the alive tokens of a group of spans, as providers:
    read (one host read) only by a strategy that asks for them, and an ``InvalidInputError`` when the
    images of the group differ there (one context holds one value for the batch)."""
    out: dict[str, Any] = {}
    for name in ("positions", "tiles", "frames"):
        values = [s.positions if name == "positions" else getattr(s.geometry, name, None) for s in members]
        if any(v is None for v in values):
            continue

        def provide(values: list[Tensor] = values, name: str = name) -> Tensor:
            alive = [v.to(s.alive.device)[s.alive] for v, s in zip(values, members)]
            same = [torch.nan_to_num(a.float(), nan=-1.0) for a in alive]  # NaN: a token of no grid
            if not all(torch.equal(a, same[0]) for a in same[1:]):
                raise InvalidInputError(
                    f"{who}: the {len(members)} images pruned together here hold different token {name} (another "
                    f"image size, or other tokens kept by an earlier stage), and a stage's context holds one; "
                    f"run them one per call (batch size 1) for a strategy that reads {name!r}.")
            return alive[0]

        out[name] = provide
    return out


@dataclass
class _Region:
    """Layers ``>= start`` run on a shorter sequence: ``valid`` marks its real key columns."""

    start: int
    valid: Tensor  # bool [B, L_r]
    uniform: bool  # every column valid: no mask needed in prefill
    columns: Tensor | None = None  # int64 [B, L_r] the LLM-input column of each column (sliding windows)
    prefill_mask: Tensor | None = None
    gathered: dict[Any, Any] = field(default_factory=dict)  # position tensors and masks at the region's columns
    reindex: bool = False  # positions 0.. over the kept tokens instead of their original ones
    offset: Tensor | None = None  # [B] tokens dropped so far per row (re-indexed decoding positions)


@dataclass
class StageRecord:
    """What one in-LLM stage kept in one call: ``selections`` per image (indices of the
    image's original tokens), the layer, and the prompt tokens after the stage (summed over
    the prompts; beams count once)."""

    layer: int
    selections: list[ImageSelection]
    tokens_after: int


class _CallState:
    def __init__(self, spans: list[Span], valid: Tensor, stages: list[Stage],
                 texts: Callable[[int], str] | None, embeds: Tensor | None = None) -> None:
        self.spans = spans
        self.valid = valid.bool()  # [B, L] current key columns that are real tokens
        self.full_len = valid.shape[1]
        self.columns = torch.arange(valid.shape[1], device=valid.device).expand_as(valid).clone()
        self.pending = {s.layer: s for s in stages}  # not run yet
        self.captured: dict[str, Any] = {}
        self.regions: list[_Region] = []
        self.records: list[StageRecord] = []
        self.texts = texts
        self.factor = 1  # rows per prompt (beams)
        self.checks = DeferredChecks()  # plugin output checks, read after the call
        # host-side counts, read once when armed, so the forward pass itself never reads the device
        last = _last_valid(self.valid)
        counts = torch.stack([self.valid.sum(1), _instruction_columns(self.valid, spans, last).sum(1)]).tolist()
        self.row_tokens: list[int] = counts[0]  # real tokens per row
        self.input_tokens: list[int] = list(counts[0])  # real tokens per row entering the LLM
        self.instruction: list[int] = counts[1]  # instruction tokens per row (the last ones of the row)
        self.embeds = embeds  # the LLM's input embeddings (SparseVLM's raters are chosen on them)
        self.raters: Tensor | None = None  # bool [B, W] over the instruction rows (_query_rows), once chosen


class LLMPruner:
    """Runs a pipeline's in-LLM stages on one model while attached (see the module docstring)."""

    def __init__(self, model: Any, stages: Sequence[Stage], *, source: str) -> None:
        self.model = model
        self.stages = sorted(stages, key=lambda s: s.layer)
        self.source = source
        self.lm = text_model_of(model)
        self.layers = list(self.lm.layers)
        for stage in self.stages:
            if not 1 <= stage.layer < len(self.layers):
                name = str(getattr(model.config, "_name_or_path", "") or "")
                tiny = ""
                if name.startswith("tiny:"):
                    base = ":".join(name.split(":")[:2])
                    tiny = (f" {name} is a tiny random model with {len(self.layers)} decoder layers; give it more with "
                            f"{base}:<layers> (e.g. {base}:32).")
                raise InvalidInputError(
                    f"{source}: stage at layer {stage.layer}: the language model has {len(self.layers)} decoder "
                    f"layers; an in-LLM stage acts on layer 1..{len(self.layers) - 1} (scores come from layer "
                    f"K-1).{tiny}")
        self.capture_at = {s.layer - 1: s for s in self.stages if s.requires & {"llm_attention", "llm_keys"}}
        self._check_hybrid_layers(model)
        self._wants_raters = any(getattr(getattr(scorer, "params", None), "query", None) == "raters"
                                 for s in self.stages for _, scorer in s.scorers)
        rope = getattr(self.lm.config, "rope_parameters", None) or getattr(self.lm.config, "rope_scaling", None) or {}
        if any(s.positions == "reindex" for s in self.stages) and "mrope_section" in rope:
            raise IncompatibleBackboneError(
                f"{source}: positions: reindex numbers the kept tokens 0, 1, ... in one dimension; this model's "
                f"positions are multimodal (M-RoPE) and are kept as they are. Use positions: keep.")
        self.state: _CallState | None = None
        self._finished: _CallState | None = None
        self._hooks: list[Any] = []
        self._saved_impl: Any = None
        self._installed = False

    def _check_hybrid_layers(self, model: Any) -> None:
        """A hybrid LLM (Qwen3.5: linear-attention layers between full-attention ones) has attention
        weights only at its full-attention layers: refuse a stage that would read them from a linear
        layer, naming the layers it may act at. Stages that read no attention act at any layer."""
        types = getattr(self.lm.config, "layer_types", None) or []
        if LINEAR not in types:
            return
        name = type(model).__name__
        for stage in self.stages:
            needs = [(1, "llm_attention or llm_keys (read at layer K-1)")] \
                if stage.requires & {"llm_attention", "llm_keys"} else []
            needs += [(0, "llm_own_attention (read at layer K)")] if "llm_own_attention" in stage.requires else []
            for back, what in needs:  # the layer read: K - back
                if types[stage.layer - back] == LINEAR:
                    allowed = [k for k in range(1, len(types)) if types[k - back] != LINEAR]
                    raise IncompatibleBackboneError(
                        f"{self.source}: stage at layer {stage.layer} reads {what}, and layer {stage.layer - back} of "
                        f"{name}'s LLM is a linear-attention layer (no attention weights); allowed layers for this "
                        f"stage: {', '.join(map(str, allowed)) or 'none'}. Stages that read no attention (hidden-state "
                        f"similarity, ResPrune on hidden states) act at any layer.")

    # --- install / remove ------------------------------------------------------------------

    def install(self) -> None:
        config = self.lm.config
        base = config._attn_implementation
        if base not in _WRAPPED:
            raise IncompatibleBackboneError(
                f"{self.source}: in-LLM stages run on the 'sdpa' or 'eager' attention of the language model, not "
                f"{base!r}; load the model with attn_implementation='sdpa'.")
        self._saved_impl = config._attn_implementation_internal
        config._attn_implementation = _register(base)
        self._installed = True
        self._base = base
        first = self.stages[0].layer
        with _lock:
            for i in self.capture_at:
                _active[id(self.layers[i].self_attn)] = self
        for i in range(first, len(self.layers)):
            self._hooks.append(self.layers[i].register_forward_pre_hook(self._make_hook(i), with_kwargs=True))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        with _lock:
            for i in self.capture_at:
                _active.pop(id(self.layers[i].self_attn), None)
        if self._installed:
            self.lm.config._attn_implementation_internal = self._saved_impl
            self._installed = False
        self.state = self._finished = None

    # --- per call --------------------------------------------------------------------------

    def arm(self, spans: list[Span], attention_mask: Tensor, texts: Callable[[int], str] | None,
            embeds: Tensor | None = None) -> None:
        """Prepare for one forward/generate over a sequence whose visual tokens are ``spans``
        (``embeds``: the LLM's input embeddings, for the ``raters`` query)."""
        self.state = _CallState(spans, attention_mask, self.stages, texts, embeds)
        if embeds is not None and self._wants_raters:
            self.state.raters = choose_raters(self.state, embeds)

    def disarm(self) -> list[StageRecord]:
        """End the call: its records. Then ``verify`` the plugins' outputs (one host read)."""
        state, self.state = self.state, None
        self._finished = state
        return state.records if state is not None else []

    def verify(self) -> None:
        """Raise a ``PluginContractError`` if a stage's plugin returned bad values in the last call."""
        state, self._finished = self._finished, None
        if state is not None:
            state.checks.verify()

    @property
    def columns(self) -> Tensor | None:
        """The LLM-input column of each column of the last region (``-1``: padding)."""
        if self.state is None:
            return None
        return torch.where(self.state.valid, self.state.columns, -1)

    # --- the attention capture at layer K-1 -------------------------------------------------

    def _capture(self, module: Any, query: Tensor, key: Tensor, mask: Tensor | None, scaling: float | None) -> None:
        st = self.state
        layer = getattr(module, "layer_idx", None)
        if st is None or layer not in self.capture_at or self.capture_at[layer].layer not in st.pending:
            return
        if query.shape[2] != key.shape[2] or key.shape[2] != st.valid.shape[1]:
            return  # decoding, or not this call's prefill
        _fit_batch(st, query.shape[0])
        st.captured = {"query": query, "key": key.detach(), "mask": mask,
                       "scaling": module.scaling if scaling is None else scaling}

    def _attention_paid(self, query_mode: str) -> Tensor:
        """Head-mean attention ``[B, L]`` that the ``query_mode`` rows pay to every key column."""
        st = self.state
        cap = st.captured
        rows, rows_valid = _query_rows(st, query_mode, cap["query"].device)
        return attention_rows(cap["query"], cap["key"], cap["mask"], st.valid, rows, rows_valid, cap["scaling"])

    def _final_norm(self, x: Tensor) -> Tensor:
        """The language model's final norm, in its dtype, back to float32."""
        norm = self.lm.norm
        weight = getattr(norm, "weight", None)
        return norm(x.to(weight.dtype) if weight is not None else x).float()

    def _own_attention(self, layer: int, hidden: Tensor, position_embeddings: Any, query_mode: str) -> Tensor:
        """Head-mean attention ``[B, L]`` that layer ``layer`` itself will pay from the ``query_mode``
        rows, from its own query and key projections of ``hidden`` (its input), before it runs."""
        st = self.state
        if position_embeddings is None:
            raise IncompatibleBackboneError(f"{self.source}: layer {layer} gets no position_embeddings; layer "
                                            f"K's own attention needs them (use layer: previous).")
        block = self.layers[layer]
        attn = block.self_attn
        rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        if rope is None:
            raise IncompatibleBackboneError(f"{self.source}: {type(attn).__name__} has no apply_rotary_pos_emb.")
        b, length, width = hidden.shape
        rows, rows_valid = _query_rows(st, query_mode, hidden.device)
        normed = block.input_layernorm(hidden)
        head = attn.head_dim
        q = attn.q_proj(torch.gather(normed, 1, rows[..., None].expand(b, rows.shape[1], width)))
        q = q.view(b, rows.shape[1], self.lm.config.num_attention_heads, -1)
        q = q[..., :head].transpose(1, 2)  # a gated attention (Qwen3.5) projects each head's query, then its gate
        k = attn.k_proj(normed).view(b, length, -1, head).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # per-head query/key norms (Qwen3-style attention)
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = position_embeddings
        q, _ = rope(q, q, _take(cos, rows), _take(sin, rows))
        _, k = rope(k, k, cos, sin)
        return attention_rows(q, k, None, st.valid, rows, rows_valid, attn.scaling, gathered=True)

    # --- the layer pre-hook -----------------------------------------------------------------

    def _make_hook(self, index: int) -> Callable[..., Any]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            st = self.state
            if st is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            prefill = _is_prefill(kwargs.get("past_key_values"), index)
            if prefill and index in st.pending:
                _fit_batch(st, hidden.shape[0])
                before = next((r for r in reversed(st.regions) if r.start <= index), None)
                here = self._positions(st, before, kwargs, hidden, index) if before is not None else kwargs
                hidden = self._run_stage(st, st.pending.pop(index), hidden, index, here.get("position_embeddings"))
            region = next((r for r in reversed(st.regions) if r.start <= index), None)
            if region is None:
                return None
            kwargs = dict(kwargs)
            if self._layer_type(index) == LINEAR:  # a recurrent layer: its mask is the 2-D padding of the rows
                if prefill:
                    kwargs["attention_mask"] = None if region.uniform else region.valid.long()
            elif prefill:
                kwargs.update(self._positions(st, region, kwargs, hidden, index))
                kwargs["attention_mask"] = self._prefill_mask(st, region, kwargs.get("attention_mask"), hidden)
            else:
                cache = kwargs.get("past_key_values")
                layer_cache = cache.layers[index] if cache is not None else None
                seen = layer_cache.get_seq_length() if layer_cache is not None else 0
                if getattr(layer_cache, "is_sliding", False):  # keeps the last W - 1 keys only
                    kwargs["attention_mask"] = self._sliding_decode_mask(st, region, hidden, seen, layer_cache)
                else:
                    kwargs["attention_mask"] = self._decode_mask(region, kwargs.get("attention_mask"), hidden, seen)
                if region.reindex:
                    position_ids = kwargs["position_ids"] - region.offset[:, None].to(kwargs["position_ids"].device)
                    kwargs["position_ids"] = position_ids
                    kwargs["position_embeddings"] = self._rotary(hidden, position_ids, index)
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    def _positions(self, st: _CallState, region: _Region, kwargs: dict[str, Any], hidden: Tensor,
                   layer: int) -> dict[str, Any]:
        """``position_ids`` / ``position_embeddings`` of the region's columns in prefill: the
        original ones gathered, or (``reindex``) 0, 1, ... over each row's kept tokens."""
        if not region.reindex:
            return {name: self._gathered(st, region, name, kwargs[name])
                    for name in ("position_embeddings", "position_ids") if kwargs.get(name) is not None}
        kind = self._layer_type(layer)  # layers of different types may use different rotary embeddings
        if ("reindexed", kind) not in region.gathered:
            position_ids = (region.valid.long().cumsum(1) - 1).clamp_min(0).to(hidden.device)
            region.gathered["reindexed", kind] = {"position_ids": position_ids,
                                                  "position_embeddings": self._rotary(hidden, position_ids, layer)}
        return region.gathered["reindexed", kind]

    def _layer_type(self, layer: int) -> str | None:
        """The LLM config's ``layer_types[layer]`` (Gemma 3: sliding or full attention), or None."""
        types = getattr(getattr(self.lm, "config", None), "layer_types", None)
        return types[layer] if types else None

    def _rotary(self, hidden: Tensor, position_ids: Tensor, layer: int) -> Any:
        """The LLM's rotary embedding of ``position_ids`` for layer ``layer`` (Gemma 3 has one per
        layer type: its ``rotary_emb`` takes the type)."""
        kind = self._layer_type(layer)
        if kind is not None and "layer_type" in inspect.signature(self.lm.rotary_emb.forward).parameters:
            return self.lm.rotary_emb(hidden, position_ids, kind)
        return self.lm.rotary_emb(hidden, position_ids)

    def _gathered(self, st: _CallState, region: _Region, name: str, value: Any) -> Any:
        """``value`` (full-length, per position) at the columns of ``region``, computed once per call
        for each value the model passes (Gemma 3 passes one ``position_embeddings`` per layer type)."""
        cached = region.gathered.get((name, id(value)))  # the value is held there: its id is not reused
        if cached is not None and cached[0] is value:
            return cached[1]
        index = st.columns.clamp_min(0)  # position tensors are full length: index by input column
        if isinstance(value, tuple):
            out = tuple(_take(v, index) for v in value)
        else:
            out = _take(value, index)
        region.gathered[name, id(value)] = (value, out)
        return out

    def _prefill_mask(self, st: _CallState, region: _Region, mask: Tensor | None, hidden: Tensor) -> Tensor | None:
        """The mask of the region's columns in prefill: the layer's own mask (the model's, over the
        input columns, which may say more than causality: Gemma 3's bidirectional image blocks, a
        sliding window) at the kept rows and columns, or causal over them when the model passed none
        (SDPA's default). Computed once per call for each mask the model builds (one per layer type)."""
        if mask is None:
            return region.prefill_mask
        cached = region.gathered.get(("attention_mask", id(mask)))
        if cached is not None and cached[0] is mask:
            return cached[1]
        b, new_len = region.valid.shape
        index = st.columns.clamp_min(0).to(mask.device)  # [B, L']: input column of each column
        m = mask.expand(b, *mask.shape[1:]) if mask.shape[0] == 1 and b > 1 else mask
        heads = m.shape[1]
        rows = torch.gather(m, 2, index[:, None, :, None].expand(b, heads, new_len, m.shape[-1]))
        both = torch.gather(rows, 3, index[:, None, None, :].expand(b, heads, new_len, new_len))
        allowed = both if both.dtype == torch.bool else both > torch.finfo(both.dtype).min / 2
        valid = region.valid.to(mask.device)
        eye = torch.eye(new_len, dtype=torch.bool, device=mask.device)
        allowed = (allowed & valid[:, None, None, :]) | eye  # a padding query still sees itself: no NaN rows
        out = self._as_mask(allowed, hidden.dtype)
        region.gathered["attention_mask", id(mask)] = (mask, out)
        return out

    def _decode_mask(self, region: _Region, mask: Tensor | None, hidden: Tensor, seen: int) -> Tensor | None:
        """The mask of decoding queries over the region's kept columns plus the new tokens (``seen``:
        keys this layer already caches)."""
        q = hidden.shape[1]
        if mask is None and region.uniform and (self._base == "sdpa" or q == 1):
            return None  # SDPA decodes (and eager decodes one token) without a mask when nothing is padded
        b, kept = region.valid.shape
        new = seen + q - kept  # generated tokens in this layer's cache, these queries included
        if mask is not None:
            tail = mask[..., mask.shape[-1] - new:]
            tail_ok = tail if tail.dtype == torch.bool else tail > torch.finfo(tail.dtype).min / 2
        else:
            tail_ok = torch.ones(1, 1, q, new, dtype=torch.bool, device=hidden.device).tril(new - q)
        head = region.valid[:, None, None, :].expand(b, 1, q, kept)
        allowed = torch.cat([head.to(tail_ok.device), tail_ok.expand(b, 1, q, new)], dim=-1)
        return self._as_mask(allowed, hidden.dtype)

    def _sliding_decode_mask(self, st: _CallState, region: _Region, hidden: Tensor, seen: int, layer: Any) -> Tensor:
        """The mask of decoding queries at a sliding-window layer (Gemma 3's local layers) after a
        stage: its cache holds only the last ``W - 1`` keys of what it ran on (the region's kept
        columns, then the new tokens), and a query sees a key within ``W`` columns of the LLM's input
        before it, as in prefill (the model's own rule at the kept columns)."""
        q = hidden.shape[1]
        dev = hidden.device
        keys, _ = layer.get_mask_sizes(q)  # the keys this step attends: the cached ones and the queries
        b, kept = region.valid.shape
        generated = seen - kept  # tokens generated before this step
        new_cols = st.full_len + torch.arange(generated + q, device=dev)
        columns = torch.cat([region.columns.to(dev), new_cols.expand(b, -1)], dim=1)[:, -keys:]  # [B, kv]
        valid = torch.cat([region.valid.to(dev), torch.ones(b, generated + q, dtype=torch.bool, device=dev)],
                          dim=1)[:, -keys:]
        query = new_cols[generated:]  # [q]
        window = int(layer.sliding_window)
        distance = query[None, :, None] - columns[:, None, :]  # [B, q, kv]
        allowed = valid[:, None, :] & (distance >= 0) & (distance < window)
        return self._as_mask(allowed[:, None], hidden.dtype)

    def _as_mask(self, allowed: Tensor, dtype: torch.dtype) -> Tensor:
        if self._base == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)

    # --- running one stage ------------------------------------------------------------------

    def _run_stage(self, st: _CallState, stage: Stage, hidden: Tensor, layer: int, position_embeddings: Any) -> Tensor:
        """Select per image, then gather the kept columns (no host reads but the selector's check)."""
        b, length, _ = hidden.shape
        dev = hidden.device
        if length != st.valid.shape[1]:
            raise RuntimeError(f"{self.source}: layer {layer} got {length} columns, expected {st.valid.shape[1]}")
        keep = st.valid.clone()
        for span in st.spans:
            keep[span.row, span.columns] = False
        last_hidden = hidden[torch.arange(b, device=dev), _last_valid(st.valid).to(dev)].float()
        cache: dict[str, Tensor] = {}

        def attention(query: str = "last") -> Tensor:
            if "query" not in st.captured:
                raise RuntimeError(f"{self.source}: no attention was captured at layer {layer - 1}")
            if query not in cache:
                cache[query] = self._attention_paid(query)
            return cache[query]

        def own_attention(query: str = "last") -> Tensor:
            if ("own", query) not in cache:
                cache["own", query] = self._own_attention(layer, hidden, position_embeddings, query)
            return cache["own", query]

        def text_fields(rows: Tensor) -> tuple[Tensor, Tensor]:
            """Instruction tokens' hidden states ``[G, T, D]`` and key L1 norms ``[G, T]`` (-inf: padding)."""
            idx, ok = _query_rows(st, "instruction", dev)
            idx, ok = idx[rows], ok[rows]
            text_hidden = hidden[rows[:, None], idx].float()
            if "key" in st.captured:
                kc = st.captured["key"]
                norms = kc[rows.to(kc.device)[:, None], :, idx.to(kc.device)].flatten(2).float().norm(p=1, dim=-1)
            else:
                norms = torch.zeros(ok.shape, device=dev)
            return text_hidden, norms.masked_fill(~ok.to(norms.device), float("-inf"))

        groups: dict[int, list[Span]] = {}
        for span in st.spans:
            groups.setdefault(int(span.alive.numel()), []).append(span)
        records: list[ImageSelection] = []
        replace: list[tuple[int, Tensor, Tensor]] = []  # (row, columns, new hidden values)
        dropped = [0] * b  # visual tokens each row loses (host-side: budgets are known there)
        for m, members in groups.items():
            if m == 0:
                continue
            rows = torch.tensor([s.row for s in members], device=dev)
            cols = torch.stack([s.columns for s in members]).to(dev)  # [G, m]
            tokens = hidden[rows[:, None], cols].float()
            keys = None
            if "key" in st.captured:
                kc = st.captured["key"]  # [B, Hkv, L, hd]
                keys = kc[rows.to(kc.device)[:, None], :, cols.to(kc.device)].flatten(2).float()  # [G, m, Hkv*hd]
            ctx = PruneContext(
                tokens, source=f"{self.source} (layer {layer})",
                llm_attention=(lambda query="last", r=rows, c=cols: attention(query)[r[:, None], c]),
                llm_own_attention=(lambda query="last", r=rows, c=cols: own_attention(query)[r[:, None], c]),
                llm_keys=keys, llm_last_hidden=last_hidden[rows], layer=layer, llm_final_norm=self._final_norm,
                **_geometry_fields(members, f"{self.source} (layer {layer})"),
                text=None if st.texts is None else (lambda g=members: [st.texts(s.row) for s in g]),
                llm_text_hidden=lambda r=rows: text_fields(r)[0],
                llm_text_key_norm=lambda r=rows: text_fields(r)[1],
            )
            sel = stage.run(ctx, k=stage.budget_for(m), deferred=st.checks)
            k, kept = sel.k, sel.kept.to(dev)  # k: a merger may add tokens on top of the budget
            held = sel.held.to(dev)  # the token at each kept column (a merger may reorder them)
            for j, span in enumerate(members):
                alive = span.alive.to(dev)
                new_alive = alive[held[j]]  # in column order
                records.append(ImageSelection(row=span.row, image=span.image, kept=new_alive.sort().values,
                                              order=alive[sel.order[j]],
                                              k=k, n=span.n, scores={n: v[j].detach() for n, v in sel.scores.items()},
                                              geometry=span.geometry, merged=sel.merged))
                keep[span.row, cols[j, kept[j]]] = True
                if sel.features is not None:
                    replace.append((span.row, cols[j, kept[j]], sel.features[j]))
                span.alive = new_alive
                dropped[span.row] += m - k
        if replace:
            hidden = hidden.clone()
            for row, c, value in replace:
                hidden[row, c] = value.to(hidden.dtype)
        counts = [t - d for t, d in zip(st.row_tokens, dropped)]
        records.sort(key=lambda s: (s.image, s.row))
        records = [r for i, r in enumerate(records) if i == 0 or r.image != records[i - 1].image]  # beam copies
        st.records.append(StageRecord(layer, records, sum(counts) // st.factor))
        if not any(dropped) and not (stage.positions == "reindex" and st.regions):
            return hidden  # keep-all: nothing changes (re-indexing after a drop still renumbers)
        new_len = max(counts)
        # kept columns last, in their order (stable sort); what precedes them in a shorter row is padding
        index = torch.sort(keep.to(torch.uint8), dim=1, stable=True).indices[:, length - new_len:]
        valid = keep.gather(1, index)
        slot = keep.long().cumsum(1) - 1 + (new_len - keep.sum(1)).unsqueeze(1)  # a kept column's new place
        for span in st.spans:
            span.columns = slot[span.row, span.columns[keep[span.row, span.columns]]]
        st.columns = torch.gather(st.columns, 1, index)
        st.valid = valid
        st.row_tokens = counts
        region = _Region(layer, valid, all(c == new_len for c in counts), columns=st.columns,
                         reindex=stage.positions == "reindex",
                         offset=torch.tensor([t - c for t, c in zip(st.input_tokens, counts)], device=dev))
        if not region.uniform or self._base != "sdpa":  # eager attention has no causal default: it needs a mask
            causal = torch.ones(new_len, new_len, dtype=torch.bool, device=dev).tril()
            allowed = (causal[None] & valid[:, None, :]) | torch.eye(new_len, dtype=torch.bool, device=dev)[None]
            region.prefill_mask = self._as_mask(allowed[:, None], hidden.dtype)
        st.regions.append(region)
        st.captured = {}
        return torch.gather(hidden, 1, index.to(dev)[..., None].expand(b, new_len, hidden.shape[-1]))


def _take(value: Tensor, index: Tensor) -> Tensor:
    """A per-position tensor ``[B or 1, L]`` or ``[B or 1, L, D]`` (ids, cos/sin) at ``index [B, L']``."""
    b, new_len = index.shape
    if value.dim() not in (2, 3):
        raise InvalidInputError(f"cannot gather a per-position tensor of shape {tuple(value.shape)}")
    v = value.expand(b, *value.shape[1:]) if value.shape[0] == 1 and b > 1 else value
    index = index.to(v.device)
    if v.dim() == 3:
        index = index[..., None].expand(b, new_len, v.shape[-1])
    return torch.gather(v, 1, index)


def _fit_batch(st: _CallState, b: int) -> None:
    """``generate`` expands each row into beams / return sequences (``repeat_interleave``) before the
    prefill: follow it, once."""
    have = st.valid.shape[0]
    if b == have:
        return
    if b % have:
        raise InvalidInputError(f"in-LLM stage: the LLM got {b} rows for {have} prompts.")
    factor = b // have
    st.factor *= factor
    st.row_tokens = [t for t in st.row_tokens for _ in range(factor)]
    st.input_tokens = [t for t in st.input_tokens for _ in range(factor)]
    st.instruction = [t for t in st.instruction for _ in range(factor)]
    if st.raters is not None:
        st.raters = st.raters.repeat_interleave(factor, 0)
    st.valid = st.valid.repeat_interleave(factor, 0)
    st.columns = st.columns.repeat_interleave(factor, 0)
    st.spans = [Span(image=s.image, row=s.row * factor + j, n=s.n, alive=s.alive.clone(), columns=s.columns.clone(),
                     positions=s.positions, geometry=s.geometry) for s in st.spans for j in range(factor)]
    if st.texts is not None:
        texts = st.texts
        st.texts = lambda row: texts(row // factor)


def _is_prefill(cache: Any, layer: int) -> bool:
    if cache is None:
        return True
    layers = getattr(cache, "layers", None)
    if layers is not None and layer < len(layers):
        if not hasattr(layers[layer], "get_seq_length"):  # a linear-attention layer: a state, no sequence
            return not cache.has_previous_state(layer)
        return layers[layer].get_seq_length() == 0
    return cache.get_seq_length(layer) == 0


def _last_valid(valid: Tensor) -> Tensor:
    """Column of each row's last real token ``[B]``."""
    length = valid.shape[1]
    cols = torch.arange(length, device=valid.device).expand_as(valid)
    return torch.where(valid, cols, -1).amax(1).clamp_min(0)


def attention_rows(query: Tensor, key: Tensor, mask: Tensor | None, valid: Tensor, rows: Tensor, rows_valid: Tensor,
                   scaling: float, *, gathered: bool = False) -> Tensor:
    """The attention that some query rows pay to every key, averaged over heads and rows.

    Args:
        query: ``[B, H, L, hd]`` one layer's queries (after RoPE); key: ``[B, Hkv, L, hd]``.
        mask: that layer's 4-D mask (bool or additive), or ``None`` for plain causal.
        valid: bool ``[B, L]`` the real (non-padding) key columns.
        rows: int64 ``[B, R]`` the query rows; rows_valid: bool ``[B, R]`` which of them count.
        scaling: the layer's softmax scale.
        gathered: ``query`` holds the ``R`` rows only (``[B, H, R, hd]``).

    Returns:
        float32 ``[B, L]``: ``mean_r mean_h softmax(q_r k^T * scaling + mask_r)``, the rows
        of the attention matrix that eager attention would return, for ``R`` rows only.
    """
    b, heads, _, dim = query.shape
    length, kv_heads, r = key.shape[2], key.shape[1], rows.shape[1]
    qsel = query if gathered else torch.gather(query, 2, rows[:, None, :, None].expand(b, heads, r, dim))
    qsel = qsel * scaling  # scale R rows, not R x L
    # grouped-query attention: head h reads kv head h // groups; fold the groups into the rows
    # instead of repeating the keys (no copy of the keys)
    qsel = qsel.reshape(b, kv_heads, heads // kv_heads * r, dim)
    logits = torch.matmul(qsel, key.transpose(2, 3)).view(b, heads, r, -1).float()  # [B, H, R, L]
    cols = torch.arange(length, device=query.device)
    allowed = (cols[None, None, :] <= rows[:, :, None]) & valid[:, None, :].to(query.device)  # causal + padding
    if mask is not None:
        m = torch.gather(mask, 2, rows[:, None, :, None].expand(b, mask.shape[1], rows.shape[1], mask.shape[-1]))
        allowed = allowed & (m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2)[:, 0]
    bias = torch.zeros(allowed.shape, dtype=logits.dtype, device=logits.device).masked_fill_(~allowed, float("-inf"))
    probs = logits.add_(bias[:, None]).softmax(-1).mean(1)  # in place: one pass over [B, H, R, L] per step
    weights = rows_valid.to(probs.dtype)
    return (probs * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)


def _query_rows(st: _CallState, mode: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(columns [B, R], valid [B, R])`` of each row's query tokens: its last token, its
    instruction tokens (the last ``st.instruction[r]`` real columns of the row), or the
    ``raters`` among them (chosen once per call on the input embeddings, SparseVLM)."""
    last = _last_valid(st.valid).to(device)
    if mode == "last":
        return last[:, None], torch.ones(last.shape[0], 1, dtype=torch.bool, device=device)
    width = max(1, max(st.instruction, default=1))
    back = torch.arange(width - 1, -1, -1, device=device)
    count = torch.tensor(st.instruction, device=device)
    columns, valid = (last[:, None] - back).clamp_min(0), back[None] < count[:, None]
    if mode == "raters":
        if st.raters is None:
            raise InvalidInputError("query 'raters' needs the LLM's input embeddings, which this call did not give "
                                    "the in-LLM stages (attach the pipeline to the model and call it).")
        valid = valid & st.raters.to(device)
    return columns, valid


def choose_raters(st: _CallState, embeds: Tensor) -> Tensor:
    """SparseVLM's text raters, bool ``[B, W]`` over each row's instruction rows (as
    ``_query_rows`` lays them out): with ``V`` the row's visual tokens and ``T`` its instruction
    tokens (input embeddings), ``m = mean_v softmax_t(V T^T)``; a rater has ``m`` above the
    mean of ``m`` (Gumpest/SparseVLMs, ``modelling_sparse_llama.py``, before the first layer)."""
    device = embeds.device
    columns, valid = _query_rows(st, "instruction", device)
    out = torch.zeros(valid.shape, dtype=torch.bool, device=device)
    for row in range(embeds.shape[0]):
        visual = [span.columns for span in st.spans if span.row == row and span.columns.numel()]
        ok = valid[row]
        if not visual or not bool(ok.any()):
            continue
        v = embeds[row, torch.cat(visual).to(device)].float()
        t = embeds[row, columns[row, ok]].float()
        m = (v @ t.T).softmax(dim=1).mean(dim=0)  # [T]
        chosen = m > m.mean()
        out[row, ok] = chosen if bool(chosen.any()) else torch.ones_like(chosen)  # all equal: every one rates
    return out


def _instruction_columns(valid: Tensor, spans: list[Span], last: Tensor) -> Tensor:
    """bool ``[B, L]``: the real tokens after each row's last visual token (the instruction)."""
    b, length = valid.shape
    after = torch.full((b,), -1, dtype=torch.long, device=valid.device)
    for span in spans:
        if span.columns.numel():
            after[span.row] = torch.maximum(after[span.row], span.columns.max().to(valid.device))
    cols = torch.arange(length, device=valid.device)
    instr = valid & (cols[None] > after[:, None])
    return instr | (~instr.any(1, keepdim=True) & (cols[None] == last[:, None]))
