"""The ``resprune_samples`` task: the bundled photos (opened from resprune's package data) and
questions, scored by exact match and the VQA soft score against the reference answers."""

from __future__ import annotations

from typing import Any

from PIL import Image

from resprune.data import photo_path
from resprune.lmms.sample_tasks import doc_to_target, doc_to_text, process_results

__all__ = ["doc_to_visual", "doc_to_text", "doc_to_target", "process_results"]


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The record's photo (``photos/<name>.jpg`` names a bundled photo)."""
    name = doc["image"].rsplit("/", 1)[-1].removesuffix(".jpg")
    with Image.open(photo_path(name)) as image:
        return [image.convert("RGB")]
