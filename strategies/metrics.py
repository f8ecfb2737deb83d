"""Built-in metrics: reconstruction, relevance mass, fidelity, accuracy, FLOPs, KV cache,
latency, memory (see ``resprune.metrics`` for the interface)."""

from __future__ import annotations

from typing import Any

import torch

from resprune import hookimpl
from resprune.costs import LLMDims, kv_cache_bytes, prefill_flops, vision_flops
from resprune.linalg import optimal_residual, span_residual
from resprune.metrics import Example, Metric, Reference, same_answer, vqa_score


class Fidelity(Metric):
    """Agreement with the unpruned model: KL of the first answer token, top-1 agreement of it, and
    ``exact_match``: the greedy answers are the same after ``normalize_answer`` (case, punctuation,
    articles, number words), and not empty there (``same_answer``)."""

    name = "fidelity"
    lower_is_better = frozenset({"kl"})
    percent = frozenset({"top1_agree", "exact_match"})
    description = "KL divergence / top-1 agreement / same normalised answer as the unpruned model"
    needs = frozenset({"reference"})

    def compute(self, example: Example) -> dict[str, float]:
        ref = example.reference
        assert ref is not None
        p = torch.log_softmax(ref.first_logits.float(), -1)
        q = torch.log_softmax(example.first_logits.float(), -1)
        kl = float((p.exp() * (p - q)).sum())
        return {"kl": max(kl, 0.0), "top1_agree": float(ref.first_logits.argmax() == example.first_logits.argmax()),
                "exact_match": float(same_answer(ref.answer, example.answer))}


class Accuracy(Metric):
    """Against the reference answers: exact match after normalisation, and the VQA soft score."""

    name = "accuracy"
    percent = frozenset({"exact_match", "vqa_score"})
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
    return {"exact_match": float(any(same_answer(answer, a) for a in answers)), "vqa_score": vqa_score(answer, answers)}


class Reconstruction(Metric):
    """Energy of all visual tokens outside the span of the kept ones (Eq. 8), relative to
    the total and to the optimal rank-k (SVD) residual."""

    name = "reconstruction"
    lower_is_better = frozenset({"residual", "vs_svd"})
    percent = frozenset({"residual"})
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
    percent = frozenset({"share"})
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
    lower_is_better = frozenset({"prefill_tflops", "ratio"})
    description = "prefill TFLOPs of the LLM (Eq. 18) and the ratio to the unpruned prompt"

    def compute(self, example: Example) -> dict[str, float]:
        after = prefill_flops(example.dims, example.tokens)
        before = prefill_flops(example.dims, example.tokens_before)
        return {"prefill_tflops": after / 1e12, "ratio": after / before}

    def baseline(self, record: dict[str, Any], reference: Reference, dims: LLMDims) -> dict[str, float]:
        return {"prefill_tflops": prefill_flops(dims, reference.tokens) / 1e12, "ratio": 1.0}


class VisionFlops(Metric):
    """FLOPs of the vision tower's forward, which stages inside it shorten."""

    name = "vision_flops"
    lower_is_better = frozenset({"gflops", "ratio"})
    description = "vision tower GFLOPs and the ratio to the unpruned tower on the image as given (CLIP towers)"

    def compute(self, example: Example) -> dict[str, float]:
        if not example.tower_schedule or example.vision_dims is None:
            return {}
        dims, tiles = example.vision_dims, example.tower_tiles
        after = vision_flops(dims, example.tower_schedule, tiles)
        tokens, tiles = example.unresized_tower or (example.tower_schedule[0][1], tiles)  # the image as given
        return {"gflops": after / 1e9, "ratio": after / vision_flops(dims, tokens, tiles)}

    def baseline(self, record: dict[str, Any], reference: Reference, dims: LLMDims) -> dict[str, float]:
        return {"ratio": 1.0}


class KVCache(Metric):
    """KV-cache size of the prompt, in MiB (bf16)."""

    name = "kv_cache"
    lower_is_better = frozenset({"mib"})
    description = "KV cache of the prompt in MiB (bf16)"

    def compute(self, example: Example) -> dict[str, float]:
        return {"mib": kv_cache_bytes(example.dims, example.tokens) / 2**20}

    def baseline(self, record: dict[str, Any], reference: Reference, dims: LLMDims) -> dict[str, float]:
        return {"mib": kv_cache_bytes(dims, reference.tokens) / 2**20}


class Latency(Metric):
    """Milliseconds: vision tower + selection + input rewrite, prefill, whole generation."""

    name = "latency"
    lower_is_better = frozenset({"selection_ms", "prefill_ms", "total_ms"})
    description = "selection ms, prefill ms, total generation ms"
    needs = frozenset({"latency"})

    def compute(self, example: Example) -> dict[str, float]:
        return dict(example.timings)

    def baseline(self, record: dict[str, Any], reference: Reference, dims: LLMDims) -> dict[str, float]:
        return {} if reference.prefill_ms is None else {"prefill_ms": reference.prefill_ms}


class Memory(Metric):
    """Peak GPU memory of the generation, MiB (CUDA only; nothing on CPU)."""

    name = "memory"
    lower_is_better = frozenset({"peak_mib"})
    description = "peak GPU memory in MiB (CUDA only)"

    def compute(self, example: Example) -> dict[str, float]:
        return {} if example.peak_mib is None else {"peak_mib": example.peak_mib}

    def baseline(self, record: dict[str, Any], reference: Reference, dims: LLMDims) -> dict[str, float]:
        return {} if reference.peak_mib is None else {"peak_mib": reference.peak_mib}


@hookimpl
def resprune_register_metrics(register):
    for cls in (Fidelity, Accuracy, Reconstruction, RelevanceMass, Flops, VisionFlops, KVCache, Latency, Memory):
        register(cls)
