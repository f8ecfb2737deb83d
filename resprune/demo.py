"""The embedded default job: prune a bundled photograph's visual tokens on an LVLM.

By default the model is a tiny randomly initialised LLaVA-1.5 built offline (576 visual
tokens per image, like the real one), so it runs anywhere in seconds. Its answers are
noise; the selection, the token counts, the FLOPs and the timings are real. Point it at
a real checkpoint with ``--model PATH_OR_HUB_ID``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .budget import resolve_budget
from .costs import LLMDims, kv_cache_bytes, llm_dims, prefill_flops
from .data import PHOTOS, photo_path, sample_questions
from .errors import InvalidInputError
from .linalg import optimal_residual, span_residual
from .models import chat_inputs, is_tiny, load_model
from .pipeline import load_pipeline
from .prompts import tokenizer_of
from .runfiles import writable_image
from .selection import select
from .timing import median_ms
from .visualize import overlay_selection, overlay_stages

__all__ = ["DEFAULT_CONFIGS", "pixel_tokens", "compare_selectors", "run_demo", "run_video_demo"]

DEFAULT_CONFIGS = {"llava": "resprune-llava15", "llava_next": "resprune-llava-next",
                   "qwen2_5_vl": "resprune-qwen2.5-vl", "llava_onevision": "resprune-llava-onevision",
                   "gemma3": "resprune-gemma3", "qwen3_vl": "resprune-qwen3-vl",
                   "qwen3_5": "resprune-qwen3.5", "internvl": "resprune-internvl"}
VIDEO_CONFIGS = {"qwen2_5_vl": "resprune-video", "llava_onevision": "resprune-llava-onevision",
                 "qwen3_vl": "resprune-qwen3-vl", "qwen3_5": "resprune-qwen3.5"}
"""The default pipeline of ``resprune demo --video`` per model type."""
"""The paper's setting for each backbone (shipped configs)."""

VICUNA_7B = LLMDims(hidden=4096, intermediate=11008, layers=32, kv_heads=32, head_dim=128)
"""LLaVA-1.5-7B's language model, for costs at real size."""

DEMO_SELECTORS: tuple[tuple[str, dict], ...] = (
    ("residual_energy", {"seed": "norm"}),
    ("dpp", {}),
    ("divprune", {}),
    ("topk", {"score": "norm"}),
    ("uniform", {}),
    ("random", {"seed": 0}),
)


def pixel_tokens(image: Image.Image, grid: int = 24, patch: int = 14) -> tuple[Tensor, Image.Image]:
    """Square-resize ``image`` and cut it into ``grid x grid`` RGB patches of ``patch`` px."""
    side = grid * patch
    img = image.convert("RGB").resize((side, side), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)  # [H, W, 3]
    tokens = arr.reshape(grid, patch, grid, patch, 3).permute(0, 2, 1, 3, 4).reshape(grid * grid, -1)
    return tokens.contiguous(), img


def compare_selectors(tokens: Tensor, budget: int | float, grid: tuple[int, int] | None,
                      selectors: Iterable[tuple[str, dict]] = DEMO_SELECTORS) -> list[dict]:
    """Run each selector on ``tokens`` ``[N, d]``; measure how well the kept ones span the rest."""
    tokens = tokens.float()
    n = tokens.shape[0]
    k = resolve_budget(budget, n)
    total = float(tokens.double().pow(2).sum())
    best = optimal_residual(tokens, k)
    scores = {"norm": tokens.norm(dim=-1)}
    context = {"grid": grid} if grid else {}
    rows = []
    for name, params in selectors:
        kept = select(tokens, k, selector=name, scores=scores, context=context, order="selection", **params)
        ms = median_ms(lambda: select(tokens, k, selector=name, scores=scores, context=context, **params),
                       tokens.device, repeats=1)  # after a warm-up call
        resid = span_residual(tokens, kept)
        rows.append({"selector": name, "k": k, "n": n, "ms": ms, "kept": kept,
                     "residual": resid / total, "vs_svd": resid / best if best > 0 else float("nan")})
    return rows


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} "


def run_demo(model: str = "tiny:llava", *, config: str | None = None, photo: str = "astronaut",
             prompt: str | None = None, budget: int | float | None = None, overrides: Iterable[str] = (),
             out: str | Path = "resprune-demo.png", max_new_tokens: int = 12, device: str | None = None,
             print_fn: Callable[[str], Any] = print) -> dict[str, Any]:
    """Prune a bundled photo (or an image path) on ``model``; print costs; write an overlay PNG."""
    writable_image(out, "--out")  # before any model work
    path = photo_path(photo) if photo in PHOTOS else Path(photo)
    if not path.is_file():
        raise InvalidInputError(f"photo '{photo}' is neither a bundled photo ({', '.join(PHOTOS)}) nor an image file.")
    image = Image.open(path).convert("RGB")
    kwargs = {} if budget is None else {"budget": budget}
    if config is not None:  # fail on a bad config before building the model
        load_pipeline(config, list(overrides), **kwargs)
    lvlm, processor = load_model(model, device=device)
    model_type = lvlm.config.model_type
    config = config or DEFAULT_CONFIGS.get(model_type)
    if config is None:
        raise InvalidInputError(f"no default config for model type '{model_type}'; pass --config.")
    pipe = load_pipeline(config, list(overrides), **kwargs)
    if prompt is None:
        prompt = next((q["question"] for q in sample_questions() if Path(q["image"]).name == path.name),
                      "Describe the picture.") + " Answer the question using a single word or phrase."
    full_inputs = chat_inputs(processor, [image], [prompt], device=lvlm.device)
    inputs = chat_inputs(processor, pipe.prepare_images([image], processor), [prompt], device=lvlm.device) \
        if pipe.resizes_images else full_inputs  # downsampling hands the processor a smaller image
    tokenizer = tokenizer_of(processor)

    if is_tiny(model):
        print_fn(f"resprune demo: a tiny randomly initialised {model_type} model (built offline, random weights:")
        print_fn("its answers are noise; the token selection, FLOPs and timings are real). For a real model:")
        print_fn("  resprune demo --model llava-hf/llava-1.5-7b-hf      (a hub id, or a local checkpoint folder)")
    else:
        print_fn(f"resprune demo: {model} ({model_type})")
    print_fn(f"pipeline '{config}': {pipe.summary()}")
    print_fn(f"image: {path.name}   prompt: {prompt!r}\n")

    with torch.no_grad():
        full_ms = median_ms(lambda: lvlm(**full_inputs), lvlm.device)
        full_answer = lvlm.generate(**full_inputs, max_new_tokens=max_new_tokens, do_sample=False)
        with pipe.attach(lvlm, processor) as attached:
            pruned_ms = median_ms(lambda: lvlm(**inputs), lvlm.device)
            select_ms = median_ms(lambda: attached.prune(inputs), lvlm.device)
            pruned_answer = lvlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            batch = attached.last
            selections = attached.selections
        vision_ms = median_ms(lambda: attached.injector.encode(lvlm, inputs, pipe.requires), lvlm.device)

    t_full = int(full_inputs["attention_mask"].sum())  # the image as given (downsampling shrinks `inputs`)
    t_pruned = batch.token_schedule  # (first layer, tokens) pairs; one pair without in-LLM stages
    t_last = t_pruned[-1][1]
    dims = llm_dims(lvlm.config)
    stages = attached.kept_by_stage()
    for where, sels in stages:
        for i, sel in enumerate(sels):
            print_fn(f"{where} stage, image {i}: kept {sel.k} of {sel.n} visual tokens "
                     f"({100 * (1 - sel.k / sel.n):.1f}% pruned); first picks {sel.order[:8].tolist()}")
    if selections[0].text:
        print_fn(f"instruction seen by the text scorers: {selections[0].text!r}")
    rows = [
        ("prompt tokens (visual + text, last layer)", f"{t_full}", f"{t_last}", f"{t_last / t_full:.2f}x"),
        ("prefill FLOPs, this model (Eq. 18)", _si(prefill_flops(dims, t_full)), _si(prefill_flops(dims, t_pruned)),
         f"-{100 * (1 - prefill_flops(dims, t_pruned) / prefill_flops(dims, t_full)):.1f}%"),
        ("prefill FLOPs at 7B size (Vicuna-7B)", _si(prefill_flops(VICUNA_7B, t_full)),
         _si(prefill_flops(VICUNA_7B, t_pruned)),
         f"-{100 * (1 - prefill_flops(VICUNA_7B, t_pruned) / prefill_flops(VICUNA_7B, t_full)):.1f}%"),
        ("KV cache at 7B size (bf16)", f"{kv_cache_bytes(VICUNA_7B, t_full) / 2**20:.1f} MiB",
         f"{kv_cache_bytes(VICUNA_7B, t_pruned) / 2**20:.1f} MiB",
         f"{kv_cache_bytes(VICUNA_7B, t_pruned) / kv_cache_bytes(VICUNA_7B, t_full):.2f}x"),
        ("prefill ms (vision + selection + LLM)", f"{full_ms:.1f}", f"{pruned_ms:.1f}", f"{pruned_ms / full_ms:.2f}x"),
    ]
    print_fn("")
    print_fn(f"{'':<40} {'full':>12} {'pruned':>12} {'change':>8}")
    for name, a, b, c in rows:
        print_fn(f"{name:<40} {a:>12} {b:>12} {c:>8}")
    print_fn(f"  of which vision tower {vision_ms:.1f} ms; vision + selection + input rewrite {select_ms:.1f} ms")
    if is_tiny(model):
        print_fn("  (a tiny LLM costs almost nothing, so here selection time is not repaid; the FLOPs rows show "
                 "what it saves at 7B size)")
    decode = lambda ids, given: tokenizer.decode(ids[0, given["input_ids"].shape[1]:], skip_special_tokens=True)  # noqa: E731
    print_fn(f"\nanswer, full:   {decode(full_answer, full_inputs)!r}")
    print_fn(f"answer, pruned: {decode(pruned_answer, inputs)!r}")

    out = Path(out)
    if len(stages) > 1 or batch.stages:
        overlay_stages(image, [(where, sels[0]) for where, sels in stages], processor=processor, path=out)
        print_fn(f"\noverlay of the tokens each stage kept (dropped ones dimmed): {out.resolve()}")
    else:
        overlay_selection(image, selections[0], processor=processor, path=out)
        print_fn(f"\noverlay of the kept tokens (dropped ones dimmed): {out.resolve()}")

    with torch.no_grad():
        geometry = attached.injector.encode(lvlm, full_inputs, frozenset())[0]
    tokens = geometry.features.float()
    k_cmp = min(selections[0].k, max(1, tokens.shape[1] // 2))  # below the rank, or every span is complete
    comparison = compare_selectors(tokens, k_cmp, getattr(geometry, "grid", None))
    print_fn(f"\nhow well {k_cmp} tokens kept by each selector span all {tokens.shape[0]} "
             f"(this image's projector outputs, d={tokens.shape[1]}):")
    print_fn(f"{'selector':<16} {'residual %':>11} {'x SVD optimum':>14} {'select ms':>10}")
    for r in comparison:
        print_fn(f"{r['selector']:<16} {100 * r['residual']:>11.2f} {r['vs_svd']:>14.2f} {r['ms']:>10.2f}")
    print_fn("residual %: energy of all tokens outside the span of the kept ones (Eq. 8), lower is better.")
    return {"selections": selections, "stages": batch.stages, "tokens_full": t_full, "tokens_pruned": t_last,
            "flops_full": prefill_flops(dims, t_full), "flops_pruned": prefill_flops(dims, t_pruned),
            "prefill_ms_full": full_ms, "prefill_ms_pruned": pruned_ms, "overlay": out.resolve(),
            "comparison": comparison}



def run_video_demo(clip: str = "pan", *, model: str = "tiny:qwen2_5_vl", config: str | None = None,
                   frames: int = 8, prompt: str = "What happens in the video?", budget: int | float | None = None,
                   overrides: Iterable[str] = (), out: str | Path = "resprune-video.png", max_new_tokens: int = 12,
                   device: str | None = None, print_fn: Callable[[str], Any] = print) -> dict[str, Any]:
    """Prune a clip built from the bundled photos (``resprune.video.demo_clip``) on a Qwen2.5-VL or
    LLaVA-OneVision model; print what each frame kept and the costs; write a contact sheet.
    ``config``: default ``VIDEO_CONFIGS`` of the model's type."""
    from .video import demo_clip, frame_counts, require_videos, video_chat_inputs
    from .visualize import overlay_video

    writable_image(out, "--out")  # before any model work
    video = demo_clip(clip, frames=frames)
    kwargs = {} if budget is None else {"budget": budget}
    if config is not None:
        pipe = load_pipeline(config, list(overrides), **kwargs)  # a bad config fails before the model loads
    lvlm, processor = load_model(model, device=device)
    require_videos(lvlm, model, "resprune demo --video")
    if config is None:
        config = VIDEO_CONFIGS[lvlm.config.model_type]
        pipe = load_pipeline(config, list(overrides), **kwargs)
    inputs = video_chat_inputs(processor, [[video]], [prompt], device=lvlm.device)
    tokenizer = tokenizer_of(processor)
    if is_tiny(model):
        print_fn(f"resprune demo --video: a tiny randomly initialised {lvlm.config.model_type} model (random weights: its "
                 f"answers are noise; the token selection and FLOPs are real)")
    print_fn(f"pipeline '{config}': {pipe.summary()}; video.allocation: {pipe.video_allocation}")
    print_fn(f"clip '{clip}': {len(video.frames)} frames of {video.frames[0].size[0]}x{video.frames[0].size[1]} at "
             f"{video.fps:g} fps   prompt: {prompt!r}\n")
    with torch.no_grad():
        full_answer = lvlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        with pipe.attach(lvlm, processor) as attached:
            pruned_answer = lvlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            batch, (sel,) = attached.last, attached.selections
    t, (rows, cols) = sel.geometry.layout["temporal"], sel.geometry.layout["grid"]
    per_frame = frame_counts(sel)
    unit = "frame pair" if lvlm.config.model_type in ("qwen2_5_vl", "qwen3_vl", "qwen3_5") else "frame"  # 2 as one
    print_fn(f"kept {sel.k} of the video's {sel.n} tokens ({t} {unit}s of {rows}x{cols}); per {unit}: {per_frame}")
    dims = llm_dims(lvlm.config)
    t_full, t_pruned = int(inputs["attention_mask"].sum()), batch.token_schedule
    print_fn(f"prompt tokens {t_full} -> {t_pruned[-1][1]}; prefill FLOPs (Eq. 18) this model "
             f"{_si(prefill_flops(dims, t_full))} -> {_si(prefill_flops(dims, t_pruned))}; at 7B size "
             f"{_si(prefill_flops(VICUNA_7B, t_full))} -> {_si(prefill_flops(VICUNA_7B, t_pruned))}")
    length = inputs["input_ids"].shape[1]
    print_fn(f"\nanswer, full:   {tokenizer.decode(full_answer[0, length:], skip_special_tokens=True)!r}")
    print_fn(f"answer, pruned: {tokenizer.decode(pruned_answer[0, length:], skip_special_tokens=True)!r}")
    overlay_video(video.frames, sel, path=out)
    print_fn(f"\ncontact sheet of the kept tokens, one panel per {unit} (dropped ones dimmed): {Path(out).resolve()}")
    return {"selection": sel, "per_frame": per_frame, "tokens_full": t_full, "tokens_pruned": t_pruned[-1][1],
            "overlay": Path(out).resolve()}
