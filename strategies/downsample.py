"""Image downsampling: the image is made smaller before the processor, so the vision tower itself
yields at most the budget. The baseline VTC-Bench finds beating many advanced methods.

Only backbones whose processors turn a smaller image into fewer tokens can do this (dynamic
resolution: Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT's tiles, InternVL's tiles); a fixed-resolution
processor (LLaVA-1.5, Gemma 3) gives the same count for any size, and asking it for fewer is
an error that points at ``pool``.

The size: the largest ``(w * s, h * s)`` whose processed token count is at most the budget,
with the model's own processor counting the tokens (so every processor's rounding, minimum and
maximum pixels and tiling are its own): scales falling by ``sqrt(2)`` until one fits (counts need
not fall monotonically: LLaVA-NeXT picks its tiles by the aspect ratio of the rounded size), then
bisection between it and the next larger one. The resampling is
PIL's bicubic, as VTC-Bench's ``visual.resize((w // r, h // r), Image.BICUBIC)``; VTC-Bench
picks an integer ratio ``r`` and then JPEG-encodes the image, resprune picks the scale that
fits the budget and hands the processor the resized pixels as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.budget import resolve_budget
from resprune.context import PruneContext
from resprune.errors import InvalidInputError
from resprune.interfaces import Selector

__all__ = ["DownsampleSelector", "visual_token_count", "downsample_image"]

STEPS = 24
"""Bisection steps on the scale (2^-24: below one pixel for any image a processor accepts)."""


def _image_token_id(processor: Any) -> int:
    """The id of the tokens that stand for image features in the prompt (the tokenizer's first:
    Gemma 3's processor names its begin-of-image marker ``image_token``, its tokenizer the soft token)."""
    tokenizer = getattr(processor, "tokenizer", None)
    for owner in (tokenizer, processor):
        token_id = getattr(owner, "image_token_id", None)
        if isinstance(token_id, int):
            return token_id
    token = getattr(processor, "image_token", None)
    if token is None or tokenizer is None:
        raise InvalidInputError(f"selector 'downsample': processor {type(processor).__name__} names no image token "
                                f"(image_token / image_token_id), so the tokens an image becomes cannot be counted.")
    return int(tokenizer.convert_tokens_to_ids(token))


def visual_token_count(processor: Any, image: Any) -> int:
    """How many image tokens ``processor`` turns ``image`` into: the image placeholders of the
    one-turn chat it renders for it (its own chat template and expansion, as the model gets it)."""
    from resprune.models import chat_inputs

    batch = chat_inputs(processor, [image], ["?"])
    return int((batch["input_ids"] == _image_token_id(processor)).sum())


def downsample_image(image: Any, budget: int | float, processor: Any) -> Any:
    """``image`` resized (bicubic) to the largest scale whose token count is at most ``budget``
    (an int count, or a float share of the image's own count); the image itself when it fits."""
    from PIL import Image

    full = visual_token_count(processor, image)
    k = resolve_budget(budget, full)
    if full <= k:
        return image
    w, h = image.size

    def size(scale: float) -> tuple[int, int]:
        return max(1, round(w * scale)), max(1, round(h * scale))

    def count(scale: float) -> int:
        return visual_token_count(processor, image.resize(size(scale), resample=Image.BICUBIC))

    # token counts need not fall monotonically with the size (LLaVA-NeXT picks its tiles by the aspect
    # ratio a rounded size has): scan scales down by sqrt(2) for the largest that fits, then bisect above it
    high, low, least = 1.0, None, full
    scale = 1.0
    while min(size(scale)) > 1 or scale == 1.0:
        scale /= math.sqrt(2)
        tokens = count(scale)
        least = min(least, tokens)
        if tokens <= k:
            low = scale
            break
        high = scale
    if low is None:
        fixed = " (a fixed-resolution processor: every size gives the same count)" if least == full else ""
        raise InvalidInputError(
            f"selector 'downsample': {type(processor).__name__} turns this {w}x{h} image into {full} tokens and no "
            f"smaller version into fewer than {least}{fixed}, so downsampling cannot bring it to the budget of {k}. "
            f"Use selector 'pool' (average pooling of the token grid, config 'pool') for this budget.")
    for _ in range(STEPS):  # count(low) <= k < count(high)
        mid = (low + high) / 2
        if size(mid) in (size(low), size(high)):
            break  # no size left between them
        if count(mid) <= k:
            low = mid
        else:
            high = mid
    return image.resize(size(low), resample=Image.BICUBIC)


class DownsampleSelector(Selector):
    """The whole (downsampled) image: the pipeline resizes images before the processor."""

    name = "downsample"
    resizes_images = True
    description = "image downsampling before the processor (bicubic, the largest size within the budget; VTC-Bench)"

    def resize(self, image: Any, budget: int | float, processor: Any) -> Any:
        """The image the processor should get for ``budget`` (see ``downsample_image``)."""
        return downsample_image(image, budget, processor)

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        b, n, _ = tokens.shape
        if k >= n:  # the processor made no more tokens than the budget: all of them
            return torch.arange(n, device=tokens.device).expand(b, n).contiguous()
        raise InvalidInputError(
            f"selector 'downsample': an image reached the LLM with {tokens.shape[1]} tokens, more than the budget of "
            f"{k}: downsampling resizes images before the processor, so build the inputs from "
            f"`pipeline.prepare_images(images, processor)` (the demo, sweeps and the lmms-eval model do); it does "
            f"not resize videos.")


@hookimpl
def resprune_register_selectors(register):
    register(DownsampleSelector)
