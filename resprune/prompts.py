"""Prompts: the tokenizer of a processor, the instruction of each prompt of a batch, and the
word embedder text-conditioned scorers read (the ``text`` and ``text_embedder`` context)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import InvalidInputError, MissingContextError

__all__ = ["tokenizer_of", "row_texts", "instruction_text", "word_embedder", "per_prompt_images", "NESTED_IMAGE_PROCESSORS"]


def tokenizer_of(processor: Any) -> Any:
    """The tokenizer of a processor (or the tokenizer itself); ``None`` if there is none."""
    if processor is None:
        return None
    return getattr(processor, "tokenizer", None) or (processor if callable(getattr(processor, "encode", None))
                                                     else None)


def row_texts(input_ids: Tensor, mask: Tensor, token_id: int | Sequence[int], processor: Any,
              text: str | Sequence[str] | None, patterns: Sequence[str]) -> Callable[[int], str]:
    """A lazy ``row -> instruction`` function over a batch of prompts (decoding only happens
    if a scorer wants text): ``text`` given by the caller, else the last user turn
    (``patterns``) of each decoded prompt, without its image (and video) tokens (``token_id``)."""
    placeholders = torch.tensor([token_id] if isinstance(token_id, int) else list(token_id), device=input_ids.device)
    b = input_ids.shape[0]
    if text is not None:
        texts = [text] * b if isinstance(text, str) else list(text)
        if len(texts) != b:
            raise InvalidInputError(f"text= has {len(texts)} entries but the batch has {b} prompts.")
        return lambda r: texts[r]
    tok = tokenizer_of(processor)
    cache: dict[int, str] = {}

    def row_text(r: int) -> str:
        if r not in cache:
            if tok is None:
                raise MissingContextError("the instruction text is needed but no processor/tokenizer was given "
                                          "to attach(); pass processor=... or text=...")
            ids = input_ids[r][mask[r].bool() & ~torch.isin(input_ids[r], placeholders)].tolist()
            cache[r] = instruction_text(tok.decode(ids, skip_special_tokens=False), patterns,
                                        getattr(tok, "all_special_tokens", []))
        return cache[r]

    return row_text


def instruction_text(prompt: str, patterns: Sequence[str], specials: Sequence[str] = ()) -> str:
    """The last user turn of a decoded chat prompt, without template markers or special tokens."""
    body = prompt
    for pattern in patterns:
        found = re.findall(pattern, prompt, flags=re.S)
        if found:
            body = found[-1]
            break
    for special in sorted(specials, key=len, reverse=True):
        if special:
            body = body.replace(special, " ")
    body = re.sub(r"<\|[a-z_]+\|>", " ", body)
    return " ".join(body.split())


def word_embedder(model: Any, processor: Any) -> Callable[[str], Tensor] | None:
    """``word -> [L, D]``: the model's input embeddings of a word's sub-word tokens (the
    ``text_embedder`` context field), or ``None`` without a tokenizer."""
    tok = tokenizer_of(processor)
    if tok is None:
        return None
    table = model.get_input_embeddings()

    def embed(word: str) -> Tensor:
        ids = tok(word, add_special_tokens=False)["input_ids"]
        if not ids:
            return torch.zeros(0, table.embedding_dim)
        with torch.no_grad():
            return table(torch.as_tensor(ids, device=table.weight.device)).float()

    return embed


NESTED_IMAGE_PROCESSORS = ("Gemma3Processor",)
"""Processors that take a batch's images as one list per prompt (the others take one flat list)."""


def per_prompt_images(processor: Any, images: list[Any], counts: list[int]) -> Any:
    """``images`` (in prompt order; ``counts[i]`` of them belong to prompt ``i``) in the form the
    processor takes: one flat list, or a list per prompt for ``NESTED_IMAGE_PROCESSORS``;
    ``None`` when there are none."""
    if not images:
        return None
    if not any(cls.__name__ in NESTED_IMAGE_PROCESSORS for cls in type(processor).__mro__):
        return images
    it = iter(images)
    return [[next(it) for _ in range(c)] for c in counts]
