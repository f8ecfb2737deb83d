"""The ``resprune_video_samples`` task: the bundled clip (a path into resprune's package data, as
lmms-eval's video tasks give video files) and its questions, scored like ``resprune_samples``."""

from __future__ import annotations

from typing import Any

from resprune.data import video_path
from resprune.metrics import normalize_answer, vqa_score


def doc_to_visual(doc: dict[str, Any]) -> list[str]:
    """The record's video file (``videos/<name>.mp4`` names a bundled clip)."""
    return [str(video_path(doc["video"].rsplit("/", 1)[-1].removesuffix(".mp4")))]


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
