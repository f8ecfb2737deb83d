"""resprune inside lmms-eval: a model for ``python -m lmms_eval``, a bundled offline task, and a
reader that turns lmms-eval's result files into resprune result rows (``resprune report``).

``pip install "resprune[lmms-eval]"`` registers the model ``resprune`` through lmms-eval's
``lmms_eval.models`` entry-point group::

    python -m lmms_eval --model resprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,pipeline=resprune-llava15,budget=64 \\
        --tasks gqa,mme,pope --batch_size 8 --output_path runs/lmms

``model_args`` holds the model arguments (``MODEL_ARGS``); every other ``key=value`` is a
dotlist override of the pipeline config (``budget=64``, ``selector.params.alpha=0.5``).
``pipeline=none`` runs the unpruned model (the baseline of the ``Rel.`` column). Only this
module and ``results`` import without lmms-eval; ``resprune.lmms.model`` needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["MODEL_ID", "MODEL_ARGS", "NO_PRUNING", "STATS_PREFIX", "TASKS_DIR", "manifests", "parse_model_args", "split_model_args"]

MODEL_ID = "resprune"
"""The name lmms-eval knows the model by (``--model resprune``)."""

MODEL_ARGS = ("pretrained", "pipeline", "device", "dtype", "batch_size", "max_batch_size", "seed", "max_frames")
"""``model_args`` keys that are arguments of the model; any other key overrides the pipeline."""

NO_PRUNING = "none"
"""``pipeline=none``: the unpruned model, the baseline row of a report."""

STATS_PREFIX = "resprune."
"""Prefix of what the model measures in lmms-eval's ``throughput`` block, where each key reads
``avg_resprune.<metric>.<key>`` (lmms-eval puts ``avg_`` in front)."""

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
"""lmms-eval tasks shipped with resprune (``--include_path``; ``resprune lmms-tasks`` prints it):
``resprune_samples``, the bundled photos and questions, offline."""


def manifests() -> list[Any]:
    """The ``lmms_eval.models`` entry point: the chat model (lmms-eval's default) and the simple
    one (``--force_simple``; it also answers loglikelihood requests)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path="resprune.lmms.model.ResPruneSimple",
                          chat_class_path="resprune.lmms.model.ResPrune")]


def split_model_args(text: str) -> list[str]:
    """``a=1,b=[x,y],c="p,q"`` -> ``["a=1", "b=[x,y]", 'c="p,q"']``: commas inside brackets,
    braces or quotes do not split (as lmms-eval splits ``--model_args``)."""
    parts, current, depth, quote = [], [], 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def parse_model_args(args: str | dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``(model arguments, pipeline overrides)`` of a ``--model_args`` string (or the keyword
    arguments lmms-eval passed): model arguments are the ``MODEL_ARGS`` keys, every other
    ``key=value`` becomes a dotlist override ``"key=value"``."""
    items = args.items() if isinstance(args, dict) else (_pair(p) for p in split_model_args(args))
    model: dict[str, Any] = {}
    overrides: list[str] = []
    for key, value in items:
        if key in MODEL_ARGS:
            model[key] = value
        else:
            overrides.append(f"{key}={_text(value)}")
    return model, overrides


def _pair(part: str) -> tuple[str, str]:
    key, eq, value = part.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"model_args: '{part}' is not key=value (e.g. pretrained=PATH,pipeline=NAME,budget=64).")
    return key.strip(), value.strip()


def _text(value: Any) -> str:
    """A value lmms-eval already parsed (``True``, ``64``, ``0.5``) back as dotlist text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
