"""Metrics of an ablation: what one example's outcome under one cell is worth.

A metric is a plugin like any strategy (hook ``resprune_register_metrics``; the built-in
ones live in ``resprune.strategies.metrics``): it reads an
``Example`` (the selection, the pruned model's outputs and costs, and the unpruned
model's outputs on the same input) and returns named numbers, averaged over examples.
Its keys are reported as ``<metric>.<key>`` (``fidelity.kl``, ``accuracy.vqa_score``).
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from .costs import LLMDims
from .interfaces import Strategy

__all__ = ["Metric", "Example", "Reference", "NEEDS", "finite_number", "normalize_answer", "same_answer", "vqa_score"]

NEEDS = {
    "reference": "the unpruned model's outputs on the same input",
    "features": "every image's visual tokens before pruning",
    "latency": "timed prefill and selection (one extra forward per example)",
}
"""What a metric may ask the runner to compute (beyond the pruned generation itself)."""


@dataclass
class Reference:
    """The unpruned model on one example (computed once, shared by every cell)."""

    answer: str
    first_logits: Tensor
    tokens: int
    prefill_ms: float | None = None
    peak_mib: float | None = None


@dataclass
class Example:
    """One example's outcome under one cell.

    Attributes:
        record: the dataset record (``image``, ``question``, optional ``answers``).
        answer: the pruned model's greedy answer.
        first_logits: ``[V]`` float32 logits of its first answer token.
        selections: one ``ImageSelection`` per image.
        features: every image's visual tokens ``[N, d]`` before pruning (when requested).
        tokens_before / tokens_after: prompt tokens (visual + text) without / with pruning
            (``tokens_after``: entering the LLM).
        token_schedule: ``(first layer, tokens)`` pairs when stages inside the LLM shorten
            the prompt further (``resprune.costs``); ``None`` otherwise.
        stages: what each in-LLM stage kept (``resprune.llm_pruning.StageRecord``).
        dims: the LLM's sizes (for FLOPs and KV cache).
        tower_schedule: ``(first encoder layer, tokens summed over tiles)`` the vision tower ran
            on (``[]`` when the backbone does not record it); ``tower_tiles`` its tiles and
            ``vision_dims`` its sizes.
        timings: ``selection_ms`` (vision tower + selection + input rewrite), ``prefill_ms``,
            ``total_ms`` (generation), when requested.
        peak_mib: peak GPU memory of the pruned generation (CUDA only).
        reference: the unpruned model's outputs (when a metric needs them).
        unresized_tower: ``(tokens summed over tiles, tiles)`` of the vision tower on the image as
            given, when the pipeline resized it before the processor (``downsample``); ``None`` otherwise.
    """

    record: dict[str, Any]
    answer: str
    first_logits: Tensor
    selections: list[Any]
    tokens_before: int
    tokens_after: int
    dims: LLMDims
    features: list[Tensor] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    peak_mib: float | None = None
    reference: Reference | None = None
    token_schedule: list[tuple[int, int]] | None = None
    stages: list[Any] = field(default_factory=list)
    tower_schedule: list[tuple[int, int]] = field(default_factory=list)
    tower_tiles: int = 0
    unresized_tower: tuple[int, int] | None = None
    vision_dims: LLMDims | None = None

    @property
    def tokens(self) -> Any:
        """What the prompt costs: the schedule if there is one, else ``tokens_after``."""
        return self.token_schedule if self.token_schedule else self.tokens_after


class Metric(Strategy):
    """Base class of metrics.

    Subclasses set ``name``, declare what the runner must compute in ``needs`` (keys of
    ``NEEDS``) and implement ``compute``. ``baseline`` gives the unpruned
    model's value of the same keys, if the metric has one (for the ``full`` row and the
    relative performance); ``relative`` names the keys that enter the paper's ``Rel.``;
    ``lower_is_better`` and ``percent`` say how reports read each key.
    """

    kind: ClassVar[str] = "metric"
    needs: ClassVar[frozenset[str]] = frozenset()
    relative: ClassVar[frozenset[str]] = frozenset()
    lower_is_better: ClassVar[frozenset[str]] = frozenset()
    """Keys where smaller is better (reports bold the smallest); every other key: higher is better."""
    percent: ClassVar[frozenset[str]] = frozenset()
    """Keys that are shares in [0, 1], shown as percentages."""

    def compute(self, example: Example) -> dict[str, float]:
        raise NotImplementedError

    def baseline(self, record: dict[str, Any], reference: Reference, dims: LLMDims) -> dict[str, float]:
        return {}


# --- answer normalisation (the VQA evaluation's rules, abridged) --------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def finite_number(value: Any) -> bool:
    """A finite number (not ``None``, a bool, NaN or infinite): a metric value that can be
    compared, averaged and plotted."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def normalize_answer(text: str) -> str:
    """Lower case, number words to digits, no punctuation or articles, single spaces."""
    text = text.lower().replace("\n", " ").strip()
    text = "".join(" " if ch in string.punctuation and ch != "'" else ch for ch in text).replace("'", "")
    words = [_NUMBERS.get(w, w) for w in text.split()]
    return " ".join(_ARTICLES.sub("", " ".join(words)).split())


def same_answer(a: str, b: str) -> bool:
    """Whether two answers are the same after ``normalize_answer``. Two answers that normalise to
    nothing (punctuation, articles or stray tokens, as random tiny models emit) are not the same
    answer: they say nothing, so they never count as a match."""
    na = normalize_answer(a)
    return bool(na) and na == normalize_answer(b)


def vqa_score(answer: str, answers: list[str]) -> float:
    """VQA soft accuracy: ``min(1, matches / 3)``, averaged over leave-one-out subsets.

    With fewer than 10 reference answers it is the same rule over what there is; an answer that
    normalises to nothing matches nothing (``same_answer``).
    """
    pred = normalize_answer(answer)
    refs = [normalize_answer(a) for a in answers]
    if not pred:
        return 0.0
    if len(refs) == 1:
        return float(pred == refs[0])
    scores = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1:]
        scores.append(min(1.0, sum(r == pred for r in others) / 3.0))
    return sum(scores) / len(scores)
