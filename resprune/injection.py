"""Attaching a pipeline to a Hugging Face LVLM: prune image tokens before the LLM (and inside it).

The generic machinery every image-placeholder backbone shares (LLaVA, LLaVA-NeXT,
Qwen2.5-VL, and third-party ones). While attached, the model's own ``forward`` and
``generate`` are wrapped (instance attributes, with their signatures kept); when a call
carries pixel inputs the wrapper

1. runs the vision tower and projector once (``PlaceholderInjector.encode``);
2. picks the kept tokens of every image with the pipeline (``resprune.image_selection``:
   images of equal geometry are pruned together as one batch);
3. rewrites the text side: drops the placeholder columns of the dropped tokens from
   ``input_ids`` / ``attention_mask``, re-pads, and scatters the kept features into the
   input embeddings;
4. calls the original method with ``inputs_embeds`` and no pixel inputs; when the pipeline
   has stages inside the LLM, armed with where each image's kept tokens sit
   (``resprune.llm_pruning``), which prunes them again at those layers.

``generate`` returns the caller's original ``input_ids`` followed by the new tokens, so
code that slices off the prompt keeps working. ``forward`` returns logits for the pruned
sequence; ``Attached.last`` maps its columns back to the original ones.

``EncodedImage`` and ``ImageSelection`` (from ``resprune.image_selection``) are importable
from here too: they are what an injector's ``encode`` returns and what a handle records.
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .deepstack import DeepStack
from .errors import IncompatibleBackboneError, InvalidInputError, MissingContextError, PluginError
from .image_selection import EncodedImage, ImageSelection, select_images
from .interfaces import Injector
from .llm_pruning import LLM_STAGE_FIELDS, LLMPruner, StageRecord, Span
from .prompts import row_texts, tokenizer_of, word_embedder
from .timing import clock

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["EncodedImage", "ImageSelection", "PrunedBatch", "Attached", "PlaceholderInjector", "config_image_token_id",
           "in_sequence_order", "gather_columns"]


@dataclass
class PrunedBatch:
    """The rewritten inputs of one call.

    Attributes:
        input_ids: ``[B, L']`` with the dropped placeholders removed and rows re-padded.
        attention_mask: ``[B, L']``.
        inputs_embeds: ``[B, L', D]`` with the kept features scattered in.
        columns: int64 ``[B, L']``: the original column of each new column (-1 for padding).
        selections: one ``ImageSelection`` per image, in placeholder order.
        extra: backbone-specific model inputs (e.g. Qwen2.5-VL ``position_ids``).
        features: every image's visual tokens ``[N, D]`` before pruning.
        prune_ms: wall time of the pruning (vision tower + selection + rewrite), measured
            with device synchronisation when the handle's ``profile`` is on.
        stages: what each in-LLM stage kept (filled after the call).
        output_columns: the original column of each column of the model's output sequence
            (``columns`` unless an in-LLM stage shortened it; filled after the call).
        vision_stages: ``(where, selections per image)`` of each stage inside the vision tower:
            the tokens still there after it.
        tower_schedule: ``(first encoder layer, tokens summed over tiles)`` pairs the vision
            tower ran on (``[]`` when the backbone does not record it).
        tower_tiles: the tiles the vision tower ran on.
        deepstack: per LLM layer ``j``, the kept visual tokens' features the model adds after
            layer ``j`` (Qwen3-VL's DeepStack), ``[M, D]`` in the row-major order of the visual
            columns of ``input_ids`` (``[]``: the backbone has none).
    """

    input_ids: Tensor
    attention_mask: Tensor
    inputs_embeds: Tensor
    columns: Tensor
    selections: list[ImageSelection]
    extra: dict[str, Any] = field(default_factory=dict)
    features: list[Tensor] = field(default_factory=list)
    prune_ms: float | None = None
    row_text: Callable[[int], str] | None = None
    stages: list[StageRecord] = field(default_factory=list)
    output_columns: Tensor | None = None
    vision_stages: list[tuple[str, list[ImageSelection]]] = field(default_factory=list)
    tower_schedule: list[tuple[int, int]] = field(default_factory=list)
    tower_tiles: int = 0
    deepstack: list[Tensor] = field(default_factory=list)

    @property
    def token_schedule(self) -> list[tuple[int, int]]:
        """``(first layer, prompt tokens)`` pairs: every layer from the first of a pair on runs on
        that many tokens (summed over rows), e.g. ``[(0, 650), (2, 400)]``."""
        out = [(0, int(self.attention_mask.sum()))]
        out += [(record.layer, record.tokens_after) for record in self.stages]
        return out

    @property
    def tokens_before(self) -> int:
        return sum(s.n for s in self.selections)

    @property
    def tokens_after(self) -> int:
        return sum(s.k for s in self.selections)


_attached: weakref.WeakKeyDictionary[Any, Attached] = weakref.WeakKeyDictionary()
_attach_lock = threading.RLock()


class Attached:
    """Handle returned by ``pipeline.attach(model, processor)``; a context manager.

    Attributes:
        selections: per image of the most recent pruning call: kept indices (original
            order), selection order, budget ``k`` and ``N``.
        last: the most recent ``PrunedBatch`` (columns map, rewritten inputs).
        calls: how many calls were pruned while attached.
    """

    def __init__(self, model: Any, pipeline: Pipeline, injector: PlaceholderInjector, processor: Any,
                 text: str | Sequence[str] | None) -> None:
        self.model = model
        self.pipeline = pipeline
        self.injector = injector
        self.processor = processor
        self.text = text
        self.selections: list[ImageSelection] = []
        self.last: PrunedBatch | None = None
        self.calls = 0
        self.profile = False
        """Time each pruning with device synchronisation (``last.prune_ms``); off by default."""
        self._saved: dict[str, Any] = {}
        self._state: dict[str, Any] = {}
        self._active = False
        self._llm: LLMPruner | None = None
        self._deepstack: DeepStack | None = None

    # --- patching -----------------------------------------------------------------------

    def _install(self) -> None:
        """Patch the model, all or nothing: the check, the state and the patch happen under one lock."""
        missing = [name for name in ("forward", "generate", "get_input_embeddings")
                   if not callable(getattr(self.model, name, None))]
        if missing:
            raise IncompatibleBackboneError(
                f"injector '{self.injector.name}': {type(self.model).__name__} has no {missing[0]}(); attach() takes "
                f"the whole model with its language-model head (e.g. LlavaForConditionalGeneration, as "
                f"AutoModelForImageTextToText loads it), not an inner module such as model.model.")
        with _attach_lock:
            if self.model in _attached:
                raise InvalidInputError(
                    "this model already has a resprune pipeline attached; leave that `with` block "
                    "(or call .remove()) before attaching another.")
            self._state = self.injector.save_state(self.model)
            try:
                if self.pipeline.llm_stages:
                    self._llm = LLMPruner(self.model, self.pipeline.llm_stages, source=f"injector '{self.injector.name}'")
                    self._llm.install()
                stacked = self.injector.deepstack_layers(self.model)
                if stacked:
                    self._deepstack = DeepStack(self.model, stacked, source=f"injector '{self.injector.name}'")
                    self._deepstack.install()
                for name, make in (("forward", self._wrap_forward), ("generate", self._wrap_generate)):
                    original = getattr(self.model, name)
                    self._saved[name] = self.model.__dict__.get(name, _MISSING)
                    wrapper = make(original)
                    functools.update_wrapper(wrapper, original)  # keeps the signature generate inspects
                    setattr(self.model, name, wrapper)
            except BaseException:
                self._restore_methods()
                self._remove_hooks()
                self.injector.restore_state(self.model, self._state)
                raise
            _attached[self.model] = self
            self._active = True

    def _restore_methods(self) -> None:
        for name, value in self._saved.items():
            if value is _MISSING:
                self.model.__dict__.pop(name, None)
            else:
                self.model.__dict__[name] = value
        self._saved = {}

    def remove(self) -> None:
        """Restore the model exactly as it was before ``attach`` (exception-safe: the model is
        unpatched and free to attach again even if the injector's ``restore_state`` raises)."""
        with _attach_lock:
            if not self._active:
                return
            try:
                self._restore_methods()
                self._remove_hooks()
                self.injector.restore_state(self.model, self._state)
            except Exception as exc:
                raise PluginError(f"injector '{self.injector.name}' failed to restore the model's state "
                                  f"({type(exc).__name__}: {exc}); forward/generate are restored.") from exc
            finally:
                _attached.pop(self.model, None)
                self._active = False

    def kept_by_stage(self) -> list[tuple[str, list[ImageSelection]]]:
        """``(where, selections per image)`` of each stage in the most recent call: ``"vision layer
        K"`` inside the tower, ``"input"``, then ``"layer K"`` for the stages inside the LLM that
        ran (``[]`` before any call)."""
        if self.last is None:
            return []
        out = list(self.last.vision_stages)
        out += [("input", self.last.selections)] if self.pipeline.input_stage is not None else []
        return out + [(f"layer {record.layer}", record.selections) for record in self.last.stages]

    def _remove_hooks(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            llm.remove()
        if self._deepstack is not None:
            stack, self._deepstack = self._deepstack, None
            stack.remove()

    def __enter__(self) -> Attached:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def active(self) -> bool:
        return self._active

    # --- wrapped calls ------------------------------------------------------------------

    def prune(self, inputs: Mapping[str, Any], call: str = "forward") -> PrunedBatch:
        """Prune one call's inputs (what the wrappers do); also usable without calling the model."""
        start = clock(getattr(self.model, "device", None)) if self.profile else 0.0
        batch = self.injector.prune_inputs(self.model, inputs, self.pipeline, processor=self.processor,
                                           text=self.text, call=call)
        if self.profile:
            batch.prune_ms = (clock(getattr(self.model, "device", None)) - start) * 1e3
        self.selections = batch.selections
        self.last = batch
        self.calls += 1
        return batch

    def _wrap_forward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            kwargs = _bind(original, args, kwargs)
            if not self.injector.has_images(kwargs):
                return original(**kwargs)
            batch = self.prune(kwargs)
            new = self.injector.model_kwargs(kwargs, batch)
            labels = kwargs.get("labels")
            if labels is not None:
                if self._llm is not None:
                    raise InvalidInputError("labels: a pipeline with stages inside the LLM shortens the sequence "
                                            "the loss is computed on; compute the loss from the returned logits "
                                            "and attached.last.output_columns instead.")
                new["labels"] = gather_columns(labels, batch.columns, fill=-100)
            return self._call(original, new, batch)

        return forward

    def _wrap_generate(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def generate(*args: Any, **kwargs: Any) -> Any:
            if args:
                kwargs = {"inputs": args[0], **kwargs} if len(args) == 1 else _bind(original, args, kwargs)
            if "inputs" in kwargs and "input_ids" not in kwargs and isinstance(kwargs["inputs"], Tensor):
                kwargs["input_ids"] = kwargs.pop("inputs")
            if not self.injector.has_images(kwargs):
                return original(**kwargs)
            if kwargs.get("inputs_embeds") is not None:
                raise InvalidInputError("resprune prunes from input_ids and pixel inputs; do not also pass "
                                        "inputs_embeds to an attached model's generate().")
            if self._llm is not None and kwargs.get("use_cache") is False:
                raise InvalidInputError("use_cache=False: stages inside the LLM keep a shorter KV cache in the layers "
                                        "after them; generate with the cache (the default).")
            batch = self.prune(kwargs, "generate")
            new = self.injector.model_kwargs(kwargs, batch)
            new["input_ids"] = batch.input_ids
            out = self._call(original, new, batch)
            return _restore_prompt(out, kwargs["input_ids"], batch.input_ids.shape[1])

        return generate

    def _call(self, original: Callable[..., Any], kwargs: dict[str, Any], batch: PrunedBatch) -> Any:
        """Call the model; with in-LLM stages (and DeepStack features), armed for this call's visual tokens."""
        if self._deepstack is not None and batch.deepstack:
            ids = torch.tensor(self.injector.placeholder_ids(self.model), device=batch.input_ids.device)
            slots = torch.isin(batch.input_ids, ids) & batch.attention_mask.bool()
            self._deepstack.arm(slots, batch.deepstack, self._llm)
        try:
            return self._call_llm(original, kwargs, batch)
        finally:
            if self._deepstack is not None:
                self._deepstack.disarm()

    def _call_llm(self, original: Callable[..., Any], kwargs: dict[str, Any], batch: PrunedBatch) -> Any:
        if self._llm is None:
            batch.output_columns = batch.columns
            return original(**kwargs)
        # each image's kept tokens in the rewritten sequence, in order (row-major like the features);
        # only stages inside the LLM need them, so an input-only pipeline does not pay for the lookup
        ids = torch.tensor(self.injector.placeholder_ids(self.model), device=batch.input_ids.device)
        slots = (torch.isin(batch.input_ids, ids) & batch.attention_mask.bool()).nonzero()
        columns = slots[:, 1].split([sel.k for sel in batch.selections])
        spans = [Span(image=sel.image, row=sel.row, n=sel.n,
                      alive=(sel.kept if sel.sources is None else sel.sources).clone(), columns=cols,
                      positions=None if sel.geometry is None else sel.geometry.token_positions(),
                      geometry=sel.geometry)
                 for sel, cols in zip(batch.selections, columns)]
        self._llm.arm(spans, batch.attention_mask, batch.row_text, embeds=batch.inputs_embeds)
        try:
            out = original(**kwargs)
            columns = self._llm.columns
        finally:
            batch.stages = self._llm.disarm()
        self._llm.verify()  # the stages' plugin checks: one host read, after the model ran
        base = batch.columns.repeat_interleave(columns.shape[0] // batch.columns.shape[0], 0)  # beams
        batch.output_columns = torch.where(columns >= 0, torch.gather(base, 1, columns.clamp_min(0)), -1)
        return out

    def __repr__(self) -> str:
        state = "attached" if self._active else "removed"
        return f"Attached({type(self.model).__name__}, {self.injector.name}, {state}, calls={self.calls})"


_MISSING = object()


def _bind(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    if not args:
        return dict(kwargs)
    bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    out = dict(bound.arguments)
    extra = out.pop("kwargs", None)
    if isinstance(extra, dict):
        out.update(extra)
    return out


def gather_columns(values: Tensor, columns: Tensor, *, fill: int | float) -> Tensor:
    """``values [B, L]`` at the original columns of a rewritten batch (``columns``), ``fill`` at padding."""
    index = columns.clamp_min(0).to(values.device)
    out = torch.gather(values, 1, index)
    return out.masked_fill(columns.to(values.device) < 0, fill)


def _restore_prompt(out: Any, original_ids: Tensor, pruned_len: int) -> Any:
    """Put the caller's prompt back in front of the generated tokens."""
    sequences = out if isinstance(out, Tensor) else getattr(out, "sequences", None)
    if sequences is None:
        return out
    repeat = sequences.shape[0] // original_ids.shape[0]
    prompt = original_ids.to(sequences.device).repeat_interleave(repeat, dim=0)
    restored = torch.cat([prompt, sequences[:, pruned_len:]], dim=1)
    if isinstance(out, Tensor):
        return restored
    out.sequences = restored
    return out


# --- the injector base class ------------------------------------------------------------


def config_image_token_id(config: Any) -> int | None:
    """The id of the image placeholder token of a model config (``image_token_id``, or the
    older ``image_token_index``); ``None`` if it has neither."""
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    return None if token is None else int(token)


def in_sequence_order(inputs: Mapping[str, Any], media: dict[int, list[EncodedImage]], who: str) -> list[EncodedImage]:
    """The images and videos of ``media`` (by placeholder token) in the order their placeholder runs
    appear in the batch, row by row: the order ``prune_inputs`` scatters features in. ``who``: the
    injector's name, for the errors."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    present = torch.isin(ids, torch.tensor(list(media), device=ids.device))
    if mask is not None:
        present &= mask.bool()
    sequence = ids[present].tolist()  # one host read
    queues = {token: iter(items) for token, items in media.items()}
    out: list[EncodedImage] = []
    pos = 0
    while pos < len(sequence):
        item = next(queues[sequence[pos]], None)
        if item is None or sequence[pos: pos + item.n] != [sequence[pos]] * item.n:
            raise InvalidInputError(
                f"injector '{who}': the prompts' image and video tokens do not match the images and videos "
                "given (count, length or order); build the batch with the processor or resprune.video.")
        out.append(item)
        pos += item.n
    if any(next(q, None) is not None for q in queues.values()):
        raise InvalidInputError(f"injector '{who}': more images or videos were given than the prompts have "
                                "placeholders for.")
    return out


class PlaceholderInjector(Injector):
    """Base for backbones whose image features replace placeholder tokens in ``input_ids``.

    Subclasses implement ``encode`` (vision tower + projector, per image, once) and
    may override ``instruction_patterns``, ``extra_inputs`` and the state hooks.
    """

    pixel_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    """Model inputs whose presence means there are images to prune."""
    vision_inputs: ClassVar[tuple[str, ...]] = ("pixel_values", "image_sizes", "vision_feature_layer",
                                                "vision_feature_select_strategy")
    """Model inputs consumed by ``encode`` and dropped from the LLM call."""
    provides = frozenset({"tokens", "text", "text_embedder", "grid", "positions"})
    vision_provides: ClassVar[frozenset[str]] = frozenset()
    """Context fields a stage inside the vision tower can read (empty: no such stages; then
    ``encode`` is never given ``vision_stages``)."""
    vision_refusal: ClassVar[str] = ""
    """Why the backbone has no stages inside the vision tower, for the error (``" (...)"``)."""
    instruction_patterns: ClassVar[tuple[str, ...]] = (
        r"USER:(.*?)ASSISTANT:",
        r"\[INST\](.*?)\[/INST\]",
        r"<\|im_start\|>user(.*?)<\|im_end\|>",
        r"<\|start_header_id\|>user<\|end_header_id\|>(.*?)<\|eot_id\|>",
    )
    """Regexes that cut the last user turn out of a decoded prompt (first that matches wins)."""

    # --- what subclasses provide ---------------------------------------------------------

    @abstractmethod
    def encode(self, model: Any, inputs: Mapping[str, Any], need: frozenset[str],
               **kwargs: Any) -> list[EncodedImage]:
        """Run the vision tower and projector once; one ``EncodedImage`` per image.

        ``need`` holds the context fields the pipeline asks for (e.g. ``cls_attention``),
        so optional extras are only computed on request. Backbones with ``vision_provides``
        are also given ``vision_stages=[...]`` when the pipeline has stages inside the tower.
        """

    def model_fields(self, model: Any, need: frozenset[str]) -> dict[str, Any]:
        """Context fields that belong to the model, not to an image (e.g. ``projector``), of those
        in ``need`` (default: none)."""
        return {}

    def extra_inputs(self, model: Any, inputs: Mapping[str, Any], batch: PrunedBatch, call: str) -> dict[str, Any]:
        """Backbone-specific model inputs for the pruned sequence (default: none).

        ``call`` is ``"forward"`` or ``"generate"``: the layouts the model itself would build
        for each can differ (Qwen2.5-VL position ids).
        """
        return {}

    def deepstack_layers(self, model: Any) -> int:
        """How many LLM layers, from the first, the model adds per-token visual features after
        (Qwen3-VL's DeepStack; default 0). ``encode`` then gives every image its
        ``EncodedImage.deepstack``, and the kept tokens' features are added there."""
        return 0

    def save_state(self, model: Any) -> dict[str, Any]:
        """Model state the injector may change while attached (restored by ``restore_state``)."""
        return {}

    def restore_state(self, model: Any, state: dict[str, Any]) -> None:
        """Undo what ``save_state`` recorded."""

    # --- attaching -----------------------------------------------------------------------

    def image_token_id(self, model: Any) -> int:
        token = config_image_token_id(model.config)
        if token is None:
            raise IncompatibleBackboneError(f"injector '{self.name}': model config has no image_token_id.")
        return token

    def placeholder_ids(self, model: Any) -> tuple[int, ...]:
        """The token ids whose places visual features take (default: the image token; a backbone
        that takes videos adds its video token). ``encode`` returns one ``EncodedImage`` per run of
        them, in the order the runs appear in the batch (row-major)."""
        return (self.image_token_id(model),)

    def check_pipeline(self, pipeline: Pipeline, processor: Any, text: Any) -> None:
        """Fail before patching if a stage needs context this backbone (or the LLM) cannot supply."""
        can_read_text = tokenizer_of(processor) is not None or text is not None
        if pipeline.vision_stages and not self.vision_provides:
            raise IncompatibleBackboneError(
                f"{pipeline.vision_stages[0].where} stage: the '{self.name}' injector has no stages inside the vision "
                f"tower{self.vision_refusal}; prune at the input stage or inside the LLM.")
        for stage in pipeline.stages:
            if stage.vision_layer is not None:
                offered = set(self.vision_provides)
                supplier = "a stage inside the vision tower does not have"
            elif stage.layer is None:
                offered = set(self.provides)
                supplier = f"the '{self.name}' injector cannot supply for {', '.join(self.model_types)} models"
            else:
                offered = set(LLM_STAGE_FIELDS)
                supplier = f"a stage inside the LLM does not have"
            if tokenizer_of(processor) is None:
                offered.discard("text_embedder")
            if not can_read_text:
                offered.discard("text")
            for requester, needs in stage.requirements():
                missing = sorted(set(needs) - offered)
                if missing:
                    inside = stage.layer is not None or stage.vision_layer is not None
                    why = {
                        "text_embedder": "hidden states inside the model are not in the word-embedding space; run "
                                         "text-conditioned scorers in the input stage" if inside
                        else "pass the processor (or tokenizer) to attach() so keywords can be embedded",
                        "text": "pass the processor to attach(), or text=...",
                    }.get(missing[0], "it is not available there" if inside
                          else f"the {self.name} backbone does not provide it")
                    if stage.vision_layer is not None and missing[0] in ("text", "text_embedder"):
                        why = "text-conditioned scorers run in the input stage, on the projector's tokens"
                    raise MissingContextError(
                        f"{requester} ({stage.where} stage) needs context '{missing[0]}', which {supplier}: {why}. "
                        f"Available: {', '.join(sorted(offered))}.")

    def attach(self, model: Any, pipeline: Any, processor: Any = None, *,
               text: str | Sequence[str] | None = None) -> Attached:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in self.model_types:
            raise IncompatibleBackboneError(
                f"injector '{self.name}' handles {', '.join(self.model_types)} models, not '{model_type}'.")
        self.check_pipeline(pipeline, processor, text)
        handle = Attached(model, pipeline, self, processor, text)
        handle._install()
        return handle

    # --- pruning ------------------------------------------------------------------------

    def has_images(self, inputs: Mapping[str, Any]) -> bool:
        return any(inputs.get(key) is not None for key in self.pixel_inputs)

    def model_kwargs(self, inputs: Mapping[str, Any], batch: PrunedBatch) -> dict[str, Any]:
        """The kwargs for the original forward/generate: embeds instead of pixels."""
        drop = set(self.vision_inputs) | {"input_ids", "attention_mask", "inputs_embeds", "position_ids",
                                          "labels", "inputs"}
        out = {k: v for k, v in inputs.items() if k not in drop}
        out["inputs_embeds"] = batch.inputs_embeds
        out["attention_mask"] = batch.attention_mask
        out.update(batch.extra)
        return out

    def prune_inputs(self, model: Any, inputs: Mapping[str, Any], pipeline: Pipeline, *,
                     processor: Any = None, text: str | Sequence[str] | None = None,
                     call: str = "forward") -> PrunedBatch:
        """Encode the images, select, and rewrite the text side of one call."""
        input_ids = inputs.get("input_ids")
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise InvalidInputError(f"injector '{self.name}': input_ids [B, L] are required with pixel inputs.")
        b, length = input_ids.shape
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask.to(input_ids.device)
        token_ids = self.placeholder_ids(model)
        ids = torch.tensor(token_ids, device=input_ids.device)
        placeholder = torch.isin(input_ids, ids) & mask.bool()
        if not bool(placeholder.any()):
            raise InvalidInputError(
                f"injector '{self.name}': pixel inputs were given but the prompt has no image token "
                f"(id {', '.join(map(str, token_ids))}); build prompts with the processor (its chat template "
                f"inserts it).")
        vision = {"vision_stages": pipeline.vision_stages} if pipeline.vision_stages else {}
        images = self.encode(model, inputs, pipeline.requires, **vision)
        counts = placeholder.sum(dim=1).tolist()
        total = sum(counts)
        if total != sum(img.n for img in images):
            raise InvalidInputError(
                f"injector '{self.name}': the prompts hold {total} image tokens but the {len(images)} image(s) "
                f"give {sum(img.n for img in images)} features ({[img.n for img in images]}); each image needs "
                f"exactly its N placeholders. Use the processor that matches the model.")
        rows = _rows_of_images(placeholder, [img.n for img in images], self.name)
        texts = row_texts(input_ids, mask, token_ids, processor, text, self.instruction_patterns)
        embedder = word_embedder(model, processor)
        present = [img.present() for img in images]  # None: no token was pruned inside the vision tower
        with torch.no_grad():  # selection yields indices; the kept features keep their autograd graph
            if pipeline.input_stage is None:  # every token enters the LLM; stages inside it prune
                selections = [_everything(img, i, r, there) for i, (img, r, there) in enumerate(zip(images, rows, present))]
            else:
                seen = [img if there is None else img.subset(there) for img, there in zip(images, present)]
                selections = select_images(pipeline, seen, rows, texts, embedder, source=f"backbone '{self.name}'",
                                           fields=self.model_fields(model, pipeline.requires))
                selections = [sel if there is None else _in_full_image(sel, there, img)
                              for sel, there, img in zip(selections, present, images)]

        # rewrite: keep every non-placeholder column and the kept placeholders
        keep = mask.bool() & ~placeholder
        flat_cols = placeholder.nonzero()  # row-major: matches feature order
        offset = 0
        kept_feats: list[Tensor] = []
        kept_stack: list[list[Tensor]] = []  # per image, per DeepStack layer
        for img, sel in zip(images, selections):
            cols = flat_cols[offset: offset + img.n]
            chosen = cols[sel.kept.to(cols.device)]
            keep[chosen[:, 0], chosen[:, 1]] = True
            merged = sel.features
            kept_feats.append(img.features[sel.kept.to(img.features.device)] if merged is None
                              else merged.to(img.features.device, img.features.dtype))
            kept_stack.append([d[sel.kept.to(d.device)] for d in img.deepstack])
            offset += img.n
        counts = keep.sum(dim=1)  # [B] columns each row keeps
        new_len = int(counts.max())
        left = _pads_left(mask, processor)
        columns = torch.full((b, new_len), -1, dtype=torch.long, device=input_ids.device)
        slot = keep.cumsum(dim=1) - 1  # a kept column's place in its row, in order
        if left:
            slot += (new_len - counts).unsqueeze(1)
        rows_k, cols_k = keep.nonzero(as_tuple=True)  # every row at once (one host read)
        columns[rows_k, slot[rows_k, cols_k]] = cols_k
        pad_id = _pad_id(model, processor)
        new_ids = gather_columns(input_ids, columns, fill=pad_id)
        new_mask = (columns >= 0).to(mask.dtype)
        embed = model.get_input_embeddings()
        inputs_embeds = embed(new_ids)
        if kept_feats:
            feats = torch.cat(kept_feats).to(inputs_embeds.device, inputs_embeds.dtype)
            image_slots = torch.isin(new_ids, ids) & new_mask.bool()
            inputs_embeds = inputs_embeds.masked_scatter(image_slots.unsqueeze(-1), feats)
        batch = PrunedBatch(new_ids, new_mask, inputs_embeds, columns, selections,
                            features=[img.features for img in images], row_text=texts,
                            vision_stages=_tower_selections(pipeline, images, rows),
                            tower_schedule=_tower_schedule(images), tower_tiles=sum(img.tower_tiles for img in images),
                            deepstack=_stacked(kept_stack, self.name))
        batch.extra = self.extra_inputs(model, inputs, batch, call)
        return batch


# --- helpers of prune_inputs --------------------------------------------------------------


def _stacked(per_image: list[list[Tensor]], who: str) -> list[Tensor]:
    """The kept tokens' DeepStack features of every image, one ``[M, D]`` per layer."""
    layers = {len(features) for features in per_image}
    if len(layers) > 1:
        raise PluginError(f"injector '{who}': its images carry DeepStack features for different numbers of layers "
                          f"({sorted(layers)}); encode must give every image the same.")
    if not per_image or not per_image[0]:
        return []
    return [torch.cat([features[j] for features in per_image]) for j in range(len(per_image[0]))]


def _everything(img: EncodedImage, i: int, row: int, present: Tensor | None) -> ImageSelection:
    """Every token that came out of the vision tower (a pipeline without an input stage)."""
    kept = torch.arange(img.n) if present is None else present
    return ImageSelection(row=row, image=i, kept=kept, order=kept, k=int(kept.numel()), n=img.n,
                          geometry=_geometry(img))


def _in_full_image(sel: ImageSelection, present: Tensor, img: EncodedImage) -> ImageSelection:
    """A selection made among the ``present`` tokens of ``img``, in the indices of all its tokens."""
    scores = {}
    for name, value in sel.scores.items():
        full = torch.full((img.n,), float("nan"))
        full[present] = value
        scores[name] = full
    return ImageSelection(row=sel.row, image=sel.image, kept=present[sel.kept], order=present[sel.order], k=sel.k,
                          n=img.n, text=sel.text, scores=scores, geometry=_geometry(img), features=sel.features,
                          sources=None if sel.sources is None else present[sel.sources], merged=sel.merged)


def _tower_selections(pipeline: Pipeline, images: list[EncodedImage],
                      rows: list[int]) -> list[tuple[str, list[ImageSelection]]]:
    """What each stage inside the vision tower left of every image."""
    out = []
    for s, stage in enumerate(pipeline.vision_stages):
        sels = []
        for i, (img, row) in enumerate(zip(images, rows)):
            kept = img.vision_masks[s].nonzero().squeeze(1).cpu()
            sels.append(ImageSelection(row=row, image=i, kept=kept, order=kept, k=int(kept.numel()), n=img.n,
                                       geometry=_geometry(img)))
        out.append((stage.where, sels))
    return out


def _tower_schedule(images: list[EncodedImage]) -> list[tuple[int, int]]:
    """``(first encoder layer, tokens)`` summed over every tile of the call (``[]``: not recorded)."""
    def tokens(img: EncodedImage, layer: int) -> int:
        return [count for first, count in img.tower_schedule if first <= layer][-1] * img.tower_tiles

    recorded = [img for img in images if img.tower_schedule]
    layers = sorted({layer for img in recorded for layer, _ in img.tower_schedule})
    return [(layer, sum(tokens(img, layer) for img in recorded)) for layer in layers]


def _geometry(img: EncodedImage) -> EncodedImage:
    return EncodedImage(features=img.features[:0], grid=img.grid, positions=img.positions, tiles=img.tiles,
                        frames=img.frames, candidates=img.candidates, always=img.always, groups=img.groups,
                        layout=img.layout)


def _pad_id(model: Any, processor: Any) -> int:
    tok = tokenizer_of(processor)
    for value in (getattr(tok, "pad_token_id", None), getattr(model.generation_config, "pad_token_id", None),
                  getattr(model.config, "pad_token_id", None)):
        if isinstance(value, int):
            return value
    return 0


def _pads_left(mask: Tensor, processor: Any) -> bool:
    """Re-pad on the side the caller padded (left when unknown: what generate needs)."""
    if bool((mask[:, 0] == 0).any()):
        return True
    if bool((mask[:, -1] == 0).any()):
        return False
    tok = tokenizer_of(processor)
    return getattr(tok, "padding_side", "left") != "right"


def _rows_of_images(placeholder: Tensor, sizes: list[int], who: str) -> list[int]:
    """Batch row of each image: images fill the placeholders in row-major order."""
    flat_rows = placeholder.nonzero()[:, 0].tolist()
    rows, offset = [], 0
    for i, n in enumerate(sizes):
        span = set(flat_rows[offset: offset + n])
        if len(span) != 1:
            raise InvalidInputError(f"injector '{who}': image {i} ({n} tokens) spans prompt rows {sorted(span)}; "
                                    f"each image's placeholders must lie in one row.")
        rows.append(span.pop())
        offset += n
    return rows
