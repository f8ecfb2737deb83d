"""What the bundled lmms-eval tasks (``resprune_samples``, ``resprune_video_samples``) share: the
prompt, the target and the scores (exact match and the VQA soft score against the reference
answers). Imports without lmms-eval."""

from __future__ import annotations

from typing import Any

from ..metrics import normalize_answer, vqa_score

__all__ = ["doc_to_text", "doc_to_target", "process_results"]


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
