"""Qwen2.5-VL (``qwen2_5_vl``) on Hugging Face transformers.

Visual tokens are the 2x2-merged patches of a dynamic-resolution grid. Kept tokens keep
their original 3-D M-RoPE positions: the positions of the unpruned prompt are computed
with the model's own ``get_rope_index`` and gathered at the kept columns, and the model's
``rope_deltas`` is set for the shorter sequence so decoding continues at the right place.
There is no CLS token, so CLS-attention scorers are refused at attach time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from resprune import hookimpl
from resprune.injection import EncodedImage, PlaceholderInjector, PrunedBatch

__all__ = ["Qwen25VLInjector"]


class Qwen25VLInjector(PlaceholderInjector):
    """Qwen2.5-VL: per-image grids after the 2x2 merge; original M-RoPE positions kept."""

    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    description = "Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration), M-RoPE positions kept"
    vision_inputs = ("pixel_values", "image_grid_thw", "mm_token_type_ids")
    vision_refusal = (" (its blocks attend within windows listed by cu_seqlens and its 2x2 patch merger needs "
                      "every patch of each 2x2 group, so no layer of it can drop a patch: allowed vision layers: "
                      "none)")

    def encode(self, model: Any, inputs: Mapping[str, Any], need: frozenset[str]) -> list[EncodedImage]:
        grid_thw = inputs.get("image_grid_thw")
        if grid_thw is None:
            from resprune.errors import InvalidInputError

            raise InvalidInputError("injector 'qwen2_5_vl': image_grid_thw is required with pixel_values "
                                    "(pass the processor's output unchanged).")
        out = model.model.get_image_features(inputs["pixel_values"], grid_thw)
        merge = model.config.vision_config.spatial_merge_size
        images = []
        for feats, (t, h, w) in zip(out.pooler_output, grid_thw.tolist()):
            grid = (h // merge, w // merge) if t == 1 else None
            images.append(EncodedImage(feats, grid=grid, layout={"kind": "grid", "grid": grid, "temporal": t}))
        return images

    def extra_inputs(self, model: Any, inputs: Mapping[str, Any], batch: PrunedBatch, call: str) -> dict[str, Any]:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        types = inputs.get("mm_token_type_ids")
        if types is None:
            types = (ids == self.image_token_id(model)).int()
        pos3, _ = model.model.get_rope_index(ids, types, inputs["image_grid_thw"], attention_mask=mask)
        columns = batch.columns.to(pos3.device)
        kept = torch.gather(pos3, 2, columns.clamp_min(0).unsqueeze(0).expand(3, -1, -1))
        kept = kept.masked_fill(columns.unsqueeze(0) < 0, 0)
        new_mask = batch.attention_mask.to(pos3.device)
        valid = new_mask.long().sum(dim=1)
        model.model.rope_deltas = (kept.amax(dim=(0, 2)) + 1 - valid).unsqueeze(1)
        if call == "forward":
            return {"position_ids": kept}
        text = (new_mask.long().cumsum(-1) - 1).masked_fill(new_mask == 0, 0)
        return {"position_ids": torch.cat([text.unsqueeze(0), kept], dim=0)}

    def save_state(self, model: Any) -> dict[str, Any]:
        return {"rope_deltas": model.model.rope_deltas}

    def restore_state(self, model: Any, state: dict[str, Any]) -> None:
        model.model.rope_deltas = state["rope_deltas"]


@hookimpl
def resprune_register_injectors(register):
    register(Qwen25VLInjector)
