"""Gemma 3 (``gemma3``) on Hugging Face transformers.

An image is ``mm_tokens_per_image`` tokens (256 on the real checkpoints): the SigLIP patches
average-pooled to a square grid, then projected. With pan and scan each crop is one more image
of the same size in the prompt, and each is pruned as an image of its own. Positions are
contiguous in the pruned sequence, as for the LLaVA family (Gemma 3 uses 1-D RoPE).

In the LLM an image's tokens attend to each other both ways (``token_type_ids``, one block per
run of image tokens). The pruned sequence gets ``token_type_ids`` gathered at its kept columns,
so the kept tokens of an image stay one block and the dropped ones leave it. SigLIP has no CLS
token, so CLS-attention scorers are refused at attach time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from resprune import hookimpl
from resprune.errors import InvalidInputError
from resprune.injection import EncodedImage, PlaceholderInjector, PrunedBatch, gather_columns

__all__ = ["Gemma3Injector"]


class Gemma3Injector(PlaceholderInjector):
    """Gemma 3: pooled SigLIP tokens on a square grid per image (and per pan-and-scan crop); the
    bidirectional image blocks of the LLM follow the kept tokens."""

    name = "gemma3"
    model_types = ("gemma3",)
    provides = frozenset({"tokens", "text", "text_embedder", "grid", "positions"})
    description = "Gemma 3 (Gemma3ForConditionalGeneration): pooled SigLIP grids, bidirectional image blocks kept"
    vision_inputs = ("pixel_values", "token_type_ids")
    vision_refusal = (" (its SigLIP tower runs on every patch of the image and the average pooling after it needs "
                      "each pooling window whole: allowed vision layers: none)")
    instruction_patterns = (r"<start_of_turn>user(.*?)<end_of_turn>", *PlaceholderInjector.instruction_patterns)

    def encode(self, model: Any, inputs: Mapping[str, Any], need: frozenset[str], **kwargs: Any) -> list[EncodedImage]:
        side = int(round(model.config.mm_tokens_per_image ** 0.5))
        features = model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
        return [EncodedImage(f, grid=(side, side), layout={"kind": "grid", "grid": (side, side)}) for f in features]

    def extra_inputs(self, model: Any, inputs: Mapping[str, Any], batch: PrunedBatch, call: str) -> dict[str, Any]:
        types = inputs.get("token_type_ids")
        if types is None:
            types = (inputs["input_ids"] == self.image_token_id(model)).long()
        elif types.shape != inputs["input_ids"].shape:
            raise InvalidInputError(f"injector 'gemma3': token_type_ids has shape {tuple(types.shape)}, input_ids "
                                    f"{tuple(inputs['input_ids'].shape)}; pass the processor's output unchanged.")
        return {"token_type_ids": gather_columns(types, batch.columns, fill=0)}

    def save_state(self, model: Any) -> dict[str, Any]:
        """Lets ``generate`` take ``inputs_embeds`` while attached: Gemma 3's own
        ``prepare_inputs_for_generation`` passes them on (to GenerationMixin's) but does not name
        them, so ``generate`` refuses them. An instance attribute that names them stands in front
        of it; ``restore_state`` removes it."""
        saved = model.__dict__.get("prepare_inputs_for_generation", _ABSENT)
        original = model.prepare_inputs_for_generation

        def prepare_inputs_for_generation(input_ids: Any, inputs_embeds: Any = None, **kwargs: Any) -> Any:
            return original(input_ids, inputs_embeds=inputs_embeds, **kwargs)

        model.prepare_inputs_for_generation = prepare_inputs_for_generation
        return {"prepare_inputs_for_generation": saved}

    def restore_state(self, model: Any, state: dict[str, Any]) -> None:
        saved = state.get("prepare_inputs_for_generation", _ABSENT)
        if saved is _ABSENT:
            model.__dict__.pop("prepare_inputs_for_generation", None)
        else:
            model.prepare_inputs_for_generation = saved


_ABSENT = object()


@hookimpl
def resprune_register_injectors(register):
    register(Gemma3Injector)
