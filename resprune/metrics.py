"""Metrics of an ablation: what one example's outcome under one cell is worth.

A metric is a plugin like any strategy (hook ``resprune_register_metrics``): it reads an
:class:`Example` (the selection, the pruned model's outputs and costs, and the unpruned
model's outputs on the same input) and returns named numbers, averaged over examples.
Its keys are reported as ``<metric>.<key>`` (``fidelity.kl``, ``accuracy.vqa_score``).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._markers import hookimpl
from .costs import LLMDims, kv_cache_bytes, prefill_flops
from .interfaces import Strategy
from .linalg import optimal_residual, span_residual

__all__ = ["Metric", "Example", "Reference", "NEEDS", "normalize_answer", "vqa_score"]

NEEDS = {
    "reference": "the unpruned model's outputs on the same input",
    "features": "every image's visual tokens before pruning",
    "latency": "timed prefill and selection (one extra forward per example)",
    "memory": "peak GPU memory",
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
        selections: one :class:`~resprune.injection.ImageSelection` per image.
        features: every image's visual tokens ``[N, d]`` before pruning (when requested).
        tokens_before / tokens_after: prompt tokens (visual + text) without / with pruning.
        dims: the LLM's sizes (for FLOPs and KV cache).
        timings: ``selection_ms`` (vision tower + selection + input rewrite), ``prefill_ms``,
            ``total_ms`` (generation), when requested.
        peak_mib: peak GPU memory of the pruned generation (CUDA only).
        reference: the unpruned model's outputs (when a metric needs them).
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


class Metric(Strategy):
    """Base class of metrics.

    Subclasses set ``name``, declare what the runner must compute in ``needs`` (keys of
    :data:`NEEDS`) and implement :meth:`compute`. :meth:`baseline` gives the unpruned
    model's value of the same keys, if the metric has one (for the ``full`` row and the
    relative performance); ``relative`` names the keys that enter the paper's ``Rel.``.
    """

    kind: ClassVar[str] = "metric"
    needs: ClassVar[frozenset[str]] = frozenset()
    relative: ClassVar[frozenset[str]] = frozenset()

    def compute(self, example: Example) -> dict[str, float]:
        raise NotImplementedError

    def baseline(self, record: dict[str, Any], reference: Reference, dims: LLMDims) -> dict[str, float]:
        return {}


class Fidelity(Metric):
    """Agreement with the unpruned model: KL of the first answer token, top-1, exact answer."""

    name = "fidelity"
    description = "KL divergence / top-1 agreement / exact match against the unpruned model"
    needs = frozenset({"reference"})

    def compute(self, example: Example) -> dict[str, float]:
        ref = example.reference
        assert ref is not None
        p = torch.log_softmax(ref.first_logits.float(), -1)
        q = torch.log_softmax(example.first_logits.float(), -1)
        kl = float((p.exp() * (p - q)).sum())
        return {"kl": max(kl, 0.0), "top1_agree": float(ref.first_logits.argmax() == example.first_logits.argmax()),
                "exact_match": float(normalize_answer(ref.answer) == normalize_answer(example.answer))}


class Accuracy(Metric):
    """Against the reference answers: exact match after normalisation, and the VQA soft score."""

    name = "accuracy"
    description = "exact match and VQA soft score against the record's answers"
    relative = frozenset({"exact_match", "vqa_score"})

    def compute(self, example: Example) -> dict[str, float]:
        return _accuracy(example.answer, example.record)

    def baseline(self, record: dict[str, Any], reference: Reference, dims: LLMDims) -> dict[str, float]:
        return _accuracy(reference.answer, record)


def _accuracy(answer: str, record: dict[str, Any]) -> dict[str, float]:
    answers = record.get("answers") or []
    if not answers:
        return {}
    normalized = {normalize_answer(a) for a in answers}
    return {"exact_match": float(normalize_answer(answer) in normalized), "vqa_score": vqa_score(answer, answers)}


class Reconstruction(Metric):
    """Energy of all visual tokens outside the span of the kept ones (Eq. 8), relative to
    the total and to the optimal rank-k (SVD) residual."""

    name = "reconstruction"
    description = "residual energy outside the kept span: share of the total, and x the SVD optimum"
    needs = frozenset({"features"})

    def compute(self, example: Example) -> dict[str, float]:
        residual, vs_svd = [], []
        for sel, feats in zip(example.selections, example.features):
            v = feats.float()
            total = float(v.double().pow(2).sum())
            res = span_residual(v, sel.kept)
            best = optimal_residual(v, sel.k)
            residual.append(res / total if total > 0 else 0.0)
            if best > 1e-12 * max(total, 1e-30):
                vs_svd.append(res / best)
        out = {"residual": sum(residual) / len(residual)} if residual else {}
        if vs_svd:
            out["vs_svd"] = sum(vs_svd) / len(vs_svd)
        return out


class RelevanceMass(Metric):
    """Share of the text-relevance mass (score ``relevance``) the kept tokens hold."""

    name = "relevance_mass"
    description = "share of the relevance score mass kept"

    def compute(self, example: Example) -> dict[str, float]:
        shares = []
        for sel in example.selections:
            r = sel.scores.get("relevance")
            if r is None:
                continue
            r = torch.nan_to_num(r.float(), nan=0.0).clamp_min(0)
            total = float(r.sum())
            if total > 0:
                shares.append(float(r[sel.kept.cpu()].sum()) / total)
        return {"share": sum(shares) / len(shares)} if shares else {}


class Flops(Metric):
    """Theoretical prefill FLOPs of the LLM (Eq. 18) from the real token counts."""

    name = "flops"
    description = "prefill TFLOPs of the LLM (Eq. 18) and the ratio to the unpruned prompt"

    def compute(self, example: Example) -> dict[str, float]:
        after = prefill_flops(example.dims, example.tokens_after)
        before = prefill_flops(example.dims, example.tokens_before)
        return {"prefill_tflops": after / 1e12, "ratio": after / before}

    def baseline(self, record: dict[str, Any], reference: Reference, dims: LLMDims) -> dict[str, float]:
        return {"prefill_tflops": prefill_flops(dims, reference.tokens) / 1e12, "ratio": 1.0}


class KVCache(Metric):
    """KV-cache size of the prompt, in MiB (bf16)."""

    name = "kv_cache"
    description = "KV cache of the prompt in MiB (bf16)"

    def compute(self, example: Example) -> dict[str, float]:
        return {"mib": kv_cache_bytes(example.dims, example.tokens_after) / 2**20}

    def baseline(self, record: dict[str, Any], reference: Reference, dims: LLMDims) -> dict[str, float]:
        return {"mib": kv_cache_bytes(dims, reference.tokens) / 2**20}


class Latency(Metric):
    """Milliseconds: vision tower + selection + input rewrite, prefill, whole generation."""

    name = "latency"
    description = "selection ms, prefill ms, total generation ms"
    needs = frozenset({"latency"})

    def compute(self, example: Example) -> dict[str, float]:
        return dict(example.timings)

    def baseline(self, record: dict[str, Any], reference: Reference, dims: LLMDims) -> dict[str, float]:
        return {} if reference.prefill_ms is None else {"prefill_ms": reference.prefill_ms}


class Memory(Metric):
    """Peak GPU memory of the generation, MiB (CUDA only; nothing on CPU)."""

    name = "memory"
    description = "peak GPU memory in MiB (CUDA only)"
    needs = frozenset({"memory"})

    def compute(self, example: Example) -> dict[str, float]:
        return {} if example.peak_mib is None else {"peak_mib": example.peak_mib}

    def baseline(self, record: dict[str, Any], reference: Reference, dims: LLMDims) -> dict[str, float]:
        return {} if reference.peak_mib is None else {"peak_mib": reference.peak_mib}


# --- answer normalisation (the VQA evaluation's rules, abridged) --------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def normalize_answer(text: str) -> str:
    """Lower case, number words to digits, no punctuation or articles, single spaces."""
    text = text.lower().replace("\n", " ").strip()
    text = "".join(" " if ch in string.punctuation and ch != "'" else ch for ch in text).replace("'", "")
    words = [_NUMBERS.get(w, w) for w in text.split()]
    return " ".join(_ARTICLES.sub("", " ".join(words)).split())


def vqa_score(answer: str, answers: list[str]) -> float:
    """VQA soft accuracy: ``min(1, matches / 3)``, averaged over leave-one-out subsets.

    With fewer than 10 reference answers it is the same rule over what there is.
    """
    pred = normalize_answer(answer)
    refs = [normalize_answer(a) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    scores = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1:]
        scores.append(min(1.0, sum(r == pred for r in others) / 3.0))
    return sum(scores) / len(scores)


@hookimpl
def resprune_register_metrics(register):
    for cls in (Fidelity, Accuracy, Reconstruction, RelevanceMass, Flops, KVCache, Latency, Memory):
        register(cls)
