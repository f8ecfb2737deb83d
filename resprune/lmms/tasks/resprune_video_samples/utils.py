"""The ``resprune_video_samples`` task: the bundled clip (a path into resprune's package data, as
lmms-eval's video tasks give video files) and its questions, scored like ``resprune_samples``."""

from __future__ import annotations

from typing import Any

from resprune.data import video_path
from resprune.lmms.sample_tasks import doc_to_target, doc_to_text, process_results

__all__ = ["doc_to_visual", "doc_to_text", "doc_to_target", "process_results"]


def doc_to_visual(doc: dict[str, Any]) -> list[str]:
    """The record's video file (``videos/<name>.mp4`` names a bundled clip)."""
    return [str(video_path(doc["video"].rsplit("/", 1)[-1].removesuffix(".mp4")))]
