"""Qwen3-VL (``qwen3_vl``) on Hugging Face transformers.

Visual tokens are the 2x2-merged 16 px patches of a dynamic-resolution grid, as for Qwen2.5-VL
(``resprune.backbones.qwen2_5_vl``): kept tokens keep their original interleaved M-RoPE
positions (the model's own ``get_rope_index`` on the unpruned prompt, gathered at the kept
columns) and ``rope_deltas`` is set for the shorter sequence.

DeepStack: the vision tower also returns features of some of its layers
(``deepstack_visual_indexes``), which the LLM adds to the hidden states of the visual tokens
after its first decoder layers. Each image's ``EncodedImage.deepstack`` holds them per token;
a token dropped before the LLM is dropped from every one, and a stage inside the LLM at a layer
where they are still pending drops them with its tokens (``resprune.deepstack``). A merged
token keeps the DeepStack features of the token that holds its place.

Videos are one ``EncodedImage`` of ``t x rows x cols`` tokens (``t`` temporal patches of 2
frames), as for Qwen2.5-VL; Qwen3-VL writes a timestamp before each temporal patch, so the
tokens of a video are ``t`` runs in the prompt, which stay one video for the selection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from resprune import hookimpl
from resprune.errors import InvalidInputError
from resprune.injection import EncodedImage, PrunedBatch, in_sequence_order

from .qwen2_5_vl import Qwen25VLInjector, _encoded

__all__ = ["Qwen3VLInjector"]


class Qwen3VLInjector(Qwen25VLInjector):
    """Qwen3-VL: Qwen2.5-VL's grids and M-RoPE positions, plus DeepStack features that follow the
    kept tokens."""

    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    description = ("Qwen3-VL (Qwen3VLForConditionalGeneration): images and videos, M-RoPE positions and DeepStack "
                   "features kept")
    vision_inputs = ("pixel_values", "image_grid_thw", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw")
    vision_refusal = (" (its blocks attend over whole images listed by cu_seqlens, its DeepStack mergers read "
                      "every patch of chosen layers and its 2x2 patch merger needs every patch of each 2x2 group: "
                      "allowed vision layers: none)")

    def deepstack_layers(self, model: Any) -> int:
        return len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or ())

    def encode(self, model: Any, inputs: Mapping[str, Any], need: frozenset[str], **kwargs: Any) -> list[EncodedImage]:
        merge = model.config.vision_config.spatial_merge_size
        media: dict[int, list[EncodedImage]] = {}
        for kind, pixels, grids in (("image", "pixel_values", "image_grid_thw"),
                                    ("video", "pixel_values_videos", "video_grid_thw")):
            if inputs.get(pixels) is None:
                continue
            grid_thw = inputs.get(grids)
            if grid_thw is None:
                raise InvalidInputError(f"injector '{self.name}': {grids} is required with {pixels} (pass the "
                                        f"processor's output unchanged).")
            encode = model.model.get_image_features if kind == "image" else model.model.get_video_features
            out = encode(inputs[pixels], grid_thw, return_dict=True)
            sizes = [f.shape[0] for f in out.pooler_output]
            stacked = [layer.split(sizes) for layer in (getattr(out, "deepstack_features", None) or [])]
            token = self.image_token_id(model) if kind == "image" else int(model.config.video_token_id)
            media[token] = []
            for i, (feats, (t, h, w)) in enumerate(zip(out.pooler_output, grid_thw.tolist())):
                image = _encoded(feats, t, h // merge, w // merge, kind)
                image.deepstack = [layer[i] for layer in stacked]
                media[token].append(image)
        return in_sequence_order(inputs, media, self.name)

    def extra_inputs(self, model: Any, inputs: Mapping[str, Any], batch: PrunedBatch, call: str) -> dict[str, Any]:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        types = inputs.get("mm_token_type_ids")
        if types is None:
            types = (ids == self.image_token_id(model)).int() + 2 * (ids == model.config.video_token_id).int()
        positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=types,
                                                  image_grid_thw=inputs.get("image_grid_thw"),
                                                  video_grid_thw=inputs.get("video_grid_thw"), attention_mask=mask)
        return self.kept_positions(model, positions, batch, call)


@hookimpl
def resprune_register_injectors(register):
    register(Qwen3VLInjector)
