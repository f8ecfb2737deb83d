"""Qwen3.5 (``qwen3_5``) on Hugging Face transformers: Qwen3-VL's vision side, a hybrid LLM.

Images and videos are encoded as on Qwen3-VL (``resprune.backbones.qwen3_vl``: 2x2-merged 16 px
patches, original interleaved M-RoPE positions kept, a timestamp before each temporal patch of a
video), without DeepStack. The LLM interleaves Gated DeltaNet layers (linear attention: a
recurrent state and a short causal convolution instead of a KV cache) with full-attention layers
(``text_config.layer_types``). Pruning before the LLM needs nothing more: every layer, linear or
not, runs on the pruned prompt, and the recurrent and convolution states ``generate`` carries are
those of the pruned prompt. Stages inside the LLM: see ``resprune.llm_pruning`` (which layers
they may act at).
"""

from __future__ import annotations

from resprune import hookimpl

from .qwen3_vl import Qwen3VLInjector

__all__ = ["Qwen35Injector"]


class Qwen35Injector(Qwen3VLInjector):
    """Qwen3.5: Qwen3-VL's grids and M-RoPE positions (no DeepStack) before a hybrid LLM of linear-
    and full-attention layers."""

    name = "qwen3_5"
    model_types = ("qwen3_5",)
    description = ("Qwen3.5 (Qwen3_5ForConditionalGeneration): images and videos, M-RoPE positions kept; hybrid LLM "
                   "(in-LLM stages that read attention read it from full-attention layers)")
    vision_refusal = (" (its blocks attend over whole images listed by cu_seqlens and its 2x2 patch merger needs "
                      "every patch of each 2x2 group: allowed vision layers: none)")


@hookimpl
def resprune_register_injectors(register):
    register(Qwen35Injector)
