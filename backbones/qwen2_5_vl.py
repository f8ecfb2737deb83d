"""Qwen2.5-VL (``qwen2_5_vl``) on Hugging Face transformers.

Visual tokens are the 2x2-merged patches of a dynamic-resolution grid. Kept tokens keep
their original 3-D M-RoPE positions: the positions of the unpruned prompt are computed
with the model's own ``get_rope_index`` and gathered at the kept columns, and the model's
``rope_deltas`` is set for the shorter sequence so decoding continues at the right place.
There is no CLS token, so CLS-attention scorers are refused at attach time.

Videos (``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``; built by the
processor, or by ``resprune.video.video_chat_inputs`` where torchvision is missing) are pruned
like images: a video is one ``EncodedImage`` of ``t x rows x cols`` tokens (``t`` temporal
patches of 2 frames), whose kept tokens keep their time, row and column positions. Images and
videos may be mixed in one prompt and one batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from resprune import hookimpl
from resprune.errors import InvalidInputError
from resprune.injection import EncodedImage, PlaceholderInjector, PrunedBatch, in_sequence_order

__all__ = ["Qwen25VLInjector"]


class Qwen25VLInjector(PlaceholderInjector):
    """Qwen2.5-VL: per-image grids after the 2x2 merge, videos as ``t`` frame pairs of such grids;
    original M-RoPE positions (time included) kept."""

    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    provides = frozenset({"tokens", "text", "text_embedder", "grid", "positions", "frames"})
    description = "Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): images and videos, M-RoPE positions kept"
    pixel_inputs = ("pixel_values", "pixel_values_videos")
    vision_inputs = ("pixel_values", "image_grid_thw", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
                     "second_per_grid_ts")
    vision_refusal = (" (its blocks attend within windows listed by cu_seqlens and its 2x2 patch merger needs "
                      "every patch of each 2x2 group, so no layer of it can drop a patch: allowed vision layers: "
                      "none)")

    def placeholder_ids(self, model: Any) -> tuple[int, ...]:
        return (self.image_token_id(model), int(model.config.video_token_id))

    def encode(self, model: Any, inputs: Mapping[str, Any], need: frozenset[str]) -> list[EncodedImage]:
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
            # Qwen3-VL's tower also returns DeepStack features, concatenated over its images: split them
            sizes = [f.shape[0] for f in out.pooler_output]
            stacked = [layer.split(sizes) for layer in (getattr(out, "deepstack_features", None) or [])]
            token = self.image_token_id(model) if kind == "image" else int(model.config.video_token_id)
            media[token] = [_encoded(feats, t, h // merge, w // merge, kind, [layer[i] for layer in stacked])
                            for i, (feats, (t, h, w)) in enumerate(zip(out.pooler_output, grid_thw.tolist()))]
        return in_sequence_order(inputs, media, self.name)

    def extra_inputs(self, model: Any, inputs: Mapping[str, Any], batch: PrunedBatch, call: str) -> dict[str, Any]:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        types = inputs.get("mm_token_type_ids")
        if types is None:
            types = (ids == self.image_token_id(model)).int() + 2 * (ids == model.config.video_token_id).int()
        pos3, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=inputs.get("image_grid_thw"),
                                             video_grid_thw=inputs.get("video_grid_thw"),
                                             second_per_grid_ts=inputs.get("second_per_grid_ts"), attention_mask=mask)
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


def _encoded(features: Any, t: int, rows: int, cols: int, kind: str, deepstack: list[Any]) -> EncodedImage:
    """One image (``t == 1``) or video (``t`` temporal patches of ``rows x cols`` tokens, frame by
    frame): its tokens, grid (images only), per-token (row, col) positions and DeepStack features."""
    if kind == "image" and t == 1:
        return EncodedImage(features, grid=(rows, cols), layout={"kind": "grid", "grid": (rows, cols), "temporal": t},
                            deepstack=deepstack)
    frame = torch.stack([torch.arange(rows, dtype=torch.float32).repeat_interleave(cols),
                         torch.arange(cols, dtype=torch.float32).repeat(rows)], dim=1)
    return EncodedImage(features, positions=frame.repeat(t, 1), frames=torch.arange(t).repeat_interleave(rows * cols),
                        layout={"kind": kind, "grid": (rows, cols), "temporal": t}, deepstack=deepstack)


@hookimpl
def resprune_register_injectors(register):
    register(Qwen25VLInjector)
