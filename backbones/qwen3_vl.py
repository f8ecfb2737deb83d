"""Qwen3-VL (``qwen3_vl``) on Hugging Face transformers.

Visual tokens are the 2x2-merged 16 px patches of a dynamic-resolution grid, encoded as for
Qwen2.5-VL (``resprune.backbones.qwen2_5_vl``, whose code this injector runs): kept tokens keep
their original interleaved M-RoPE positions (the model's own ``get_rope_index`` on the unpruned
prompt, gathered at the kept columns) and ``rope_deltas`` is set for the shorter sequence.

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

from typing import Any

from resprune import hookimpl

from .qwen2_5_vl import Qwen25VLInjector

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


@hookimpl
def resprune_register_injectors(register):
    register(Qwen3VLInjector)
