"""End to end: does pruning make prefill and generation faster? full / pruned / oracle.

Run from the repository root::

    python benchmarks/bench_e2e.py --smoke                      # tiny models, seconds (CI)
    python benchmarks/bench_e2e.py                              # tiny models at real token counts
    python benchmarks/bench_e2e.py --size 7b --device cuda      # random-weight 7B models, bf16

For each backbone, batch size and budget it times three runs of the same model on the same
prompts (a bundled photo and its sample question per row):

- ``full``: the unpruned model;
- ``pruned``: a shipped pipeline attached (vision tower + selection + LLM): ResPrune and the
  methods the paper compares against (``--methods``: ToMe inside the vision tower; VisionZip,
  VisPruner, SCOPE, HiRED before the LLM; FastV, PyramidDrop and DART inside it);
- ``oracle``: what pruning costs with zero selection work. Before the LLM: the vision tower,
  then the LLM fed the same kept tokens, precomputed. Inside the LLM: the same stages (layers
  and budgets) picking ``uniform`` tokens, so nothing is scored or captured at layer K-1.
  ``pruned / oracle`` is the selection overhead. Methods inside the vision tower (ToMe) have
  no oracle: their merging is part of the tower's run, which they shorten.

Tiny models get a 32-layer LLM (``--tiny-layers``) so every stage's layer exists.
``--size small`` keeps the real vision towers and geometry with a 32-layer LLM of width
1024, in float32: a size a CPU runs end to end in minutes (bf16 matmuls are slow on CPUs
without bf16 units). ``--size 7b`` builds the models from the real LLaVA-1.5-7B, LLaVA-NeXT-7B and Qwen2.5-VL-7B
sizes (vision towers, projectors and LLMs) with random weights, in bf16: their cost is the
real cost. Nothing is downloaded. Columns: prefill ms (median), generate tokens/s for
``--new-tokens`` new tokens per row, peak GPU memory (CUDA only), KV-cache MiB and prefill
TFLOPs by Eq. 18 (from the real token counts), visual tokens kept per image.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

import resprune
from resprune.costs import kv_cache_bytes, llm_dims, prefill_flops
from resprune.data import sample_questions
from resprune.demo import DEFAULT_CONFIGS
from resprune.models import chat_inputs
from resprune.stages import Stage
from resprune.tiny import tiny_lvlm

from common import device_name, emit, sync, timed

FULL_SIZE: dict[str, dict[str, dict[str, Any]]] = {
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 + 2-layer MLP + Vicuna-7B
    "llava": {
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       projection_dim=768),
        "text": dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
    },
    # LLaVA-NeXT-7B (Vicuna): the same towers, AnyRes up to 2x2 crops of 336 px
    "llava_next": {
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       projection_dim=768),
        "text": dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
    },
    # Qwen2.5-VL-7B
    "qwen2_5_vl": {
        "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
        "text": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    },
}

SMALL_SIZE: dict[str, dict[str, dict[str, Any]]] = {
    # the real towers, a 0.5B-class LLM (32 layers of width 1024): float32 on a CPU in minutes
    model_type: {"vision": sizes["vision"],
                 "text": {**sizes["text"], "hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16,
                          "num_key_value_heads": 16 if model_type != "qwen2_5_vl" else 2}}
    for model_type, sizes in FULL_SIZE.items()
}
"""``--size small``: the 7B models' vision towers and geometry with a narrower LLM, float32."""

IMAGE_SIZE = {"llava": 336, "llava_next": 336, "qwen2_5_vl": 896}
"""Processor sizes: LLaVA 576 tokens, LLaVA-NeXT up to 2880, Qwen2.5-VL up to 1024 per image."""

BUDGETS = {"llava": [64, 192], "llava_next": [320, 960], "qwen2_5_vl": [0.1111, 0.3333]}
"""The paper's 88.9 % and 66.7 % pruning levels per backbone."""

METHODS = ("resprune", "tome", "visionzip", "vispruner", "scope", "hired", "fastv", "pdrop", "dart")

NO_ORACLE = ("tome",)
"""Methods inside the vision tower: their selection is part of the tower's run (no oracle)."""

CLIP_ONLY = ("tome", "vispruner", "scope", "hired")
"""Methods that read a CLIP tower's CLS token or act inside it (no row on Qwen2.5-VL)."""


def method_config(method: str, model_type: str) -> str | None:
    """The shipped config of ``method`` for ``model_type`` (``None``: the method does not apply)."""
    if method in CLIP_ONLY and model_type == "qwen2_5_vl":
        return None
    if method == "resprune":
        return DEFAULT_CONFIGS[model_type]
    if method == "visionzip" and model_type == "qwen2_5_vl":
        return "visionzip-qwen2.5-vl"  # no CLS token in Qwen2.5-VL's tower
    if method == "pdrop" and model_type == "qwen2_5_vl":
        return "pdrop-qwen2.5-vl"  # M-RoPE positions are kept, not re-indexed
    return method


def uniform_stages(pipe: Any) -> Any:
    """The in-LLM oracle: ``pipe``'s stages (layers, budgets) with ``uniform`` picks and no scorers."""
    stages = [Stage("uniform", budget=s.budget, layer=s.layer) for s in pipe.llm_stages]
    return resprune.Pipeline(None, budget=pipe.budget, stages=stages)


@dataclass
class Row:
    backbone: str
    method: str
    batch: int
    budget: Any
    variant: str
    kept: str
    prompt_tokens: int
    prefill_ms: float
    tokens_per_s: float
    peak_mib: float | None
    kv_mib: float
    tflops: float


def build(model_type: str, size: str, device: torch.device, tiny_layers: int = 32) -> tuple[Any, Any]:
    """A tiny model (real token counts) or a random-weight larger one, and its processor."""
    model, processor = tiny_lvlm(model_type, image_size=IMAGE_SIZE[model_type], text_layers=tiny_layers,
                                 vision_layers=24 if model_type != "qwen2_5_vl" else 2)  # CLIP-L's depth
    if size == "tiny":
        return model.to(device), processor
    cfg = full_size_config(model.config, model_type, SMALL_SIZE if size == "small" else FULL_SIZE)
    dtype = torch.bfloat16 if size == "7b" else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            big = type(model)(cfg)
    finally:
        torch.set_default_dtype(old)
    big.generation_config = model.generation_config
    params = sum(p.numel() for p in big.parameters())
    print(f"{model_type}: {params / 1e9:.2f} B parameters (random, {dtype})", file=sys.stderr)
    return big.eval(), processor


def full_size_config(cfg: Any, model_type: str, sizes: dict[str, dict[str, dict[str, Any]]] = FULL_SIZE) -> Any:
    """The tiny config (token ids, processor geometry) with the real model sizes (or ``sizes``)."""
    derived = {"head_dim", "layer_types"}  # computed from the sizes at init: rebuild, don't copy
    for part in ("vision", "text"):
        sub = getattr(cfg, f"{part}_config")
        values = {k: v for k, v in sub.to_dict().items() if k not in derived}
        values.update(sizes[model_type][part])
        setattr(cfg, f"{part}_config", type(sub)(**values))
    return cfg


def prompts(model_type: str, batch: int) -> tuple[list[Image.Image], list[str]]:
    records = sample_questions()
    images, texts = [], []
    for i in range(batch):
        rec = records[i % len(records)]
        img = Image.open(rec["image"]).convert("RGB")
        if model_type == "qwen2_5_vl":  # upsample so the dynamic resolution reaches ~1k tokens
            img = img.resize((IMAGE_SIZE[model_type], round(IMAGE_SIZE[model_type] * img.height / img.width)))
        images.append(img)
        texts.append(rec["question"] + " Answer the question using a single word or phrase.")
    return images, texts


def measure(model: Any, call: Any, gen: Any, batch: int, new_tokens: int, device: torch.device,
            repeats: int) -> tuple[float, float, float | None]:
    """Prefill ms, generate tokens/s and peak MiB of one variant."""
    with torch.no_grad():
        prefill = timed(call, device, repeats)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        gen()  # warm-up
        sync(device)
        start = time.perf_counter()
        gen()
        sync(device)
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return prefill, batch * new_tokens / seconds, peak


def run(args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    rows: list[Row] = []
    for model_type in args.backbones:
        model, processor = build(model_type, args.size, device, args.tiny_layers)
        dims = llm_dims(model.config)
        value_bytes = 2 if args.size == "7b" else 4
        gen_kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        for batch in args.batches:
            images, texts = prompts(model_type, batch)
            inputs = chat_inputs(processor, images, texts, device=device)
            if args.size == "7b":
                inputs = {k: (v.to(torch.bfloat16) if torch.is_floating_point(v) else v) for k, v in inputs.items()}
            t_full = int(inputs["attention_mask"].sum())
            p, tps, peak = measure(model, lambda: model(**inputs), lambda: model.generate(**inputs, **gen_kw),
                                   batch, args.new_tokens, device, args.repeats)
            rows.append(Row(model_type, "-", batch, "-", "full", "all", t_full, p, tps, peak,
                            kv_cache_bytes(dims, t_full, value_bytes) / 2**20, prefill_flops(dims, t_full) / 1e12))
            for method in args.methods:
                budgets = args.budgets or BUDGETS[model_type]
                if method != "resprune" and getattr(args, "other_budgets", None) is not None:
                    budgets = budgets[: args.other_budgets]
                if method_config(method, model_type) is None:
                    continue
                for budget in budgets:
                    pipe = resprune.load_pipeline(method_config(method, model_type), budget=budget)
                    rows += measure_method(model, processor, pipe, method, inputs, batch, budget, dims, value_bytes,
                                           gen_kw, device, args)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def measure_method(model: Any, processor: Any, pipe: Any, method: str, inputs: Any, batch: int, budget: Any,
                   dims: Any, value_bytes: int, gen_kw: dict[str, Any], device: torch.device,
                   args: argparse.Namespace) -> list[Row]:
    """The ``pruned`` and ``oracle`` rows of one method at one budget."""
    rows = []
    with pipe.attach(model, processor) as attached, torch.no_grad():
        p, tps, peak = measure(model, lambda: model(**inputs), lambda: model.generate(**inputs, **gen_kw),
                               batch, args.new_tokens, device, args.repeats)
        model(**inputs)  # the last call's records: kept tokens and the token schedule of a prefill
        last = attached.last
        schedule = last.token_schedule
        stages = last.stages
        kept = ", ".join(sorted({f"{s.k}/{s.n}" for s in (stages[-1].selections if stages else last.selections)}))
        batch_gen = attached.prune(inputs, "generate")
        oracle_kwargs = attached.injector.model_kwargs({}, last)
        oracle_gen_kwargs = attached.injector.model_kwargs({}, batch_gen)
        encode = attached.injector.encode
    t_pruned = schedule[-1][1]
    rows.append(Row(model.config.model_type, method, batch, budget, "pruned", kept, t_pruned, p, tps, peak,
                    kv_cache_bytes(dims, schedule, value_bytes) / 2**20, prefill_flops(dims, schedule) / 1e12))
    if pipe.vision_stages:
        return rows  # inside the tower the selection is part of the tower's run: no oracle to compare with
    if pipe.llm_stages:
        if pipe.input_stage is not None:
            return rows  # no oracle for a mixed pipeline
        with uniform_stages(pipe).attach(model, processor), torch.no_grad():
            p, tps, peak = measure(model, lambda: model(**inputs), lambda: model.generate(**inputs, **gen_kw),
                                   batch, args.new_tokens, device, args.repeats)
    else:
        def oracle() -> Any:
            encode(model, inputs, frozenset())  # the vision tower still runs; no selection
            return model(**oracle_kwargs)

        def oracle_gen() -> Any:
            encode(model, inputs, frozenset())
            return model.generate(input_ids=batch_gen.input_ids, **oracle_gen_kwargs, **gen_kw)

        p, tps, peak = measure(model, oracle, oracle_gen, batch, args.new_tokens, device, args.repeats)
    rows.append(Row(model.config.model_type, method, batch, budget, "oracle", kept, t_pruned, p, tps, peak,
                    kv_cache_bytes(dims, schedule, value_bytes) / 2**20, prefill_flops(dims, schedule) / 1e12))
    return rows


def markdown(rows: list[Row], args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    dtype = "bf16" if args.size == "7b" else "float32"
    lines = [
        f"End to end, {args.size} models ({dtype}), {device_name(device)}, torch {torch.__version__}; "
        f"generate = {args.new_tokens} new tokens per row; KV cache and TFLOPs (Eq. 18) from the real token counts.",
        "",
        "| backbone | method | B | budget | run | kept/N per image | prompt tokens (last layer) | prefill ms | vs full "
        "| vs oracle | gen tok/s | peak MiB | KV MiB | prefill TFLOPs |",
        "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    full: dict[tuple[str, int], Row] = {}
    oracle: dict[tuple[str, str, int, Any], Row] = {}
    for r in rows:
        if r.variant == "full":
            full[(r.backbone, r.batch)] = r
        if r.variant == "oracle":
            oracle[(r.backbone, r.method, r.batch, r.budget)] = r
    for r in rows:
        f = full[(r.backbone, r.batch)]
        o = oracle.get((r.backbone, r.method, r.batch, r.budget))
        vs_oracle = f"{r.prefill_ms / o.prefill_ms:.2f}x" if (o is not None and r.variant == "pruned") else ""
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-"
        lines.append(
            f"| {r.backbone} | {r.method} | {r.batch} | {r.budget} | {r.variant} | {r.kept} | {r.prompt_tokens} | "
            f"{r.prefill_ms:.1f} | {r.prefill_ms / f.prefill_ms:.2f}x | {vs_oracle} | {r.tokens_per_s:.1f} | {peak} | "
            f"{r.kv_mib:.1f} | {r.tflops:.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "small", "7b"), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbones", nargs="+", default=list(FULL_SIZE), choices=list(FULL_SIZE))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--budgets", nargs="+", type=float, default=None, help="override the per-backbone budgets")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--tiny-layers", type=int, default=32, help="decoder layers of the tiny models' LLM")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="batch 1, 4 new tokens, 1 repeat, one budget")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    args = parser.parse_args(argv)
    if args.budgets:
        args.budgets = [int(b) if b >= 1 else b for b in args.budgets]
    if args.smoke:
        args.batches, args.new_tokens, args.repeats = [1], 4, 1
        args.budgets = args.budgets or [0.1111]
    if args.size == "7b" and args.device == "cpu":
        print("note: 7B models on CPU take minutes per prefill; use --device cuda", file=sys.stderr)
    table = markdown(run(args), args)
    emit(table, args.markdown)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
