"""Loading a supported LVLM (a real checkpoint or a tiny offline one) and building its inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ResPruneError
from .prompts import per_prompt_images, tokenizer_of

__all__ = ["TINY_PREFIX", "load_model", "chat_inputs", "render_chats", "is_tiny"]

TINY_PREFIX = "tiny:"
"""``tiny:llava``, ``tiny:llava_next``, ``tiny:qwen2_5_vl``, ``tiny:llava_onevision``, ``tiny:gemma3``, ``tiny:qwen3_vl``, ``tiny:qwen3_5``, ``tiny:internvl``: random tiny
models built offline
(2 decoder layers; ``tiny:llava:32`` gives the LLM 32, deep enough for in-LLM stages at the
shipped layers; the LLaVA towers have CLIP-L's 24 layers)."""

_TINY_IMAGE_SIZE = {"llava": 336, "llava_next": 336, "qwen2_5_vl": 448, "llava_onevision": 378, "gemma3": 896,
                    "qwen3_vl": 512, "qwen3_5": 512, "internvl": 448}
"""Tiny models see images at the real token counts (LLaVA-1.5: 576; LLaVA-NeXT: up to ~2900;
LLaVA-OneVision: 729 per tile as SigLIP at 384 px, 196 per video frame; Gemma 3: 256 per image;
Qwen3-VL and Qwen3.5: up to 256, 32 px per token; InternVL3: 256 per 448 px tile, up to 12 tiles and a
thumbnail)."""

_TINY_VISION_LAYERS = {"llava": 24, "llava_next": 24}
"""Tiny LLaVA towers are as deep as CLIP ViT-L/14 (24 layers, features from the 23rd), so stages
inside the tower act at the layers the shipped configs name."""


def is_tiny(spec: str) -> bool:
    return spec.startswith(TINY_PREFIX)


def load_model(spec: str, *, device: str | None = None, dtype: str = "auto", seed: int = 0) -> tuple[Any, Any]:
    """``(model, processor)`` for a hub id, a local checkpoint folder, or ``tiny:<model_type>``.

    Real checkpoints go through ``AutoModelForImageTextToText`` / ``AutoProcessor``; nothing
    is downloaded unless the hub is reachable and the id is not cached.
    """
    import torch

    if is_tiny(spec):
        from .tiny import MODEL_TYPES, tiny_lvlm

        model_type, _, depth = spec[len(TINY_PREFIX):].partition(":")
        if model_type not in MODEL_TYPES or (depth and not (depth.isdigit() and 1 <= int(depth) <= 64)):
            raise ResPruneError(f"unknown tiny model '{spec}'; use one of "
                                f"{', '.join(TINY_PREFIX + t for t in MODEL_TYPES)}, optionally with the LLM's "
                                f"depth (1-64 decoder layers), e.g. tiny:llava:32.")
        model, processor = tiny_lvlm(model_type, seed=seed, image_size=_TINY_IMAGE_SIZE[model_type],
                                     text_layers=int(depth) if depth else 2,
                                     vision_layers=_TINY_VISION_LAYERS.get(model_type, 2))
        model.config._name_or_path = spec  # errors about depth can point at tiny:<type>:<layers>
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        try:
            processor = AutoProcessor.from_pretrained(spec)
            model = AutoModelForImageTextToText.from_pretrained(spec, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            where = "local folder" if Path(spec).exists() else "hub id (needs the hub or a local cache)"
            raise ResPruneError(f"could not load model '{spec}' as a {where}: {exc}") from exc
        model.eval()
    if device:
        model.to(device)
    return model, processor


def chat_inputs(processor: Any, images: list[Any], prompts: list[str], device: Any = None) -> Any:
    """A left-padded batch of one-turn chats, one image (or ``None``) per prompt."""
    chats = [[{"role": "user", "content": ([{"type": "image"}] if image is not None else [])
               + [{"type": "text", "text": prompt}]}] for image, prompt in zip(images, prompts, strict=True)]
    return render_chats(processor, chats, [im for im in images if im is not None], device=device)


def render_chats(processor: Any, chats: list[list[dict[str, Any]]], images: list[Any], *,
                 suffixes: list[str] | None = None, device: Any = None, dtype: Any = None) -> Any:
    """A left-padded batch of conversations rendered with the processor's chat template and
    the generation prompt (then ``suffixes``, if given); ``images`` fill the conversations'
    ``{"type": "image"}`` parts in order. Floating tensors go to ``dtype`` if given."""
    tokenizer = tokenizer_of(processor)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats]
    if suffixes is not None:
        texts = [text + suffix for text, suffix in zip(texts, suffixes, strict=True)]
    counts = [sum(1 for message in chat if isinstance(message.get("content"), list)
                  for part in message["content"] if part.get("type") == "image") for chat in chats]
    batch = processor(images=per_prompt_images(processor, images, counts), text=texts, padding=True,
                      return_tensors="pt")
    moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    return batch.to(**moves) if moves else batch
