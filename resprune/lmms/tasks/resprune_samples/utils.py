"""The ``resprune_samples`` task: the bundled photos (opened from resprune's package data) and
questions, scored by exact match and the VQA soft score against the reference answers."""

from __future__ import annotations

from typing import Any

from PIL import Image

from resprune.data import photo_path
from resprune.metrics import normalize_answer, vqa_score


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The record's photo (``photos/<name>.jpg`` names a bundled photo)."""
    name = doc["image"].rsplit("/", 1)[-1].removesuffix(".jpg")
    with Image.open(photo_path(name)) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, str] | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc: dict[str, Any]) -> str:
    return doc["answers"][0]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    answer = results[0]
    answers = list(doc["answers"])
    return {"exact_match": float(normalize_answer(answer) in {normalize_answer(a) for a in answers}),
            "vqa_score": vqa_score(answer, answers)}
