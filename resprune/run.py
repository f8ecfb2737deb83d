"""One image, one prompt, any supported checkpoint: what ``resprune run`` / ``visualize`` do."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .costs import llm_dims, prefill_flops, vision_dims, vision_flops
from .data import open_image
from .models import chat_inputs, load_model
from .pipeline import Pipeline, load_pipeline
from .prompts import tokenizer_of
from .runfiles import writable_file
from .visualize import overlay_selection, overlay_stages

__all__ = ["run_one", "visualize_one"]


def _setup(config: str, overrides: Iterable[str], model: str, image: str | Path, prompt: str,
           device: str | None) -> tuple[Pipeline, Any, Any, Image.Image, Any]:
    pipe = load_pipeline(config, list(overrides))
    lvlm, processor = load_model(model, device=device)
    img = open_image(str(image))
    inputs = chat_inputs(processor, [img], [prompt], device=lvlm.device)
    return pipe, lvlm, processor, img, inputs


def run_one(config: str, overrides: Iterable[str] = (), *, model: str, image: str | Path, prompt: str,
            max_new_tokens: int = 64, device: str | None = None, out: str | Path | None = None,
            compare: bool = False, print_fn: Callable[[str], Any] = print) -> dict[str, Any]:
    """Prune with ``config`` and generate an answer; print it with the token counts and FLOPs."""
    if out is not None:
        writable_file(out, "--out")  # before any model work
    pipe, lvlm, processor, img, inputs = _setup(config, overrides, model, image, prompt, device)
    tokenizer = tokenizer_of(processor)
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad(), pipe.attach(lvlm, processor) as attached:
        start = time.perf_counter()
        ids = lvlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
        batch, selections, stages = attached.last, attached.selections, attached.kept_by_stage()
    answer = tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True)
    dims = llm_dims(lvlm.config)
    t_full = int(inputs["attention_mask"].sum())
    schedule = batch.token_schedule
    t_pruned = schedule[-1][1]
    for where, sels in stages:
        for sel in sels:
            print_fn(f"{where} stage, image {sel.image}: kept {sel.k} of {sel.n} visual tokens")
    after = " -> ".join(f"{t} (layer {layer}+)" if layer else str(t) for layer, t in schedule)
    print_fn(f"prompt tokens {t_full} -> {after}; prefill FLOPs (Eq. 18) {prefill_flops(dims, t_full):.3g} -> "
             f"{prefill_flops(dims, schedule):.3g}; generate {seconds:.2f} s")
    tower = batch.tower_schedule
    if len(tower) > 1:  # stages inside the vision tower
        vdims = vision_dims(lvlm.config)
        shrunk = " -> ".join(f"{t} (vision layer {layer}+)" for layer, t in tower[1:])
        print_fn(f"vision tower tokens {tower[0][1]} -> {shrunk}; vision FLOPs "
                 f"{vision_flops(vdims, tower[0][1], batch.tower_tiles):.3g} -> "
                 f"{vision_flops(vdims, tower, batch.tower_tiles):.3g}")
    print_fn(f"answer: {answer}")
    result: dict[str, Any] = {"answer": answer, "selections": selections, "stages": batch.stages,
                              "tokens_full": t_full, "tokens_pruned": t_pruned, "token_schedule": schedule,
                              "tower_schedule": tower, "seconds": seconds}
    if compare:
        with torch.no_grad():
            full = lvlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        result["answer_full"] = tokenizer.decode(full[0, prompt_len:], skip_special_tokens=True)
        print_fn(f"answer without pruning: {result['answer_full']}")
    if out is not None:
        if len(stages) > 1:
            overlay_stages(img, [(where, sels[0]) for where, sels in stages], processor=processor, path=out)
        else:
            overlay_selection(img, selections[0], processor=processor, path=out)
        print_fn(f"overlay: {Path(out).resolve()}")
        result["overlay"] = Path(out).resolve()
    return result


def visualize_one(config: str, overrides: Iterable[str] = (), *, model: str, image: str | Path,
                  prompt: str = "Describe the picture.", device: str | None = None,
                  out: str | Path = "resprune-overlay.png", print_fn: Callable[[str], Any] = print) -> Path:
    """Write the kept-token overlay (no generation: only the vision tower and selection run)."""
    writable_file(out, "--out")  # before any model work
    pipe, lvlm, processor, img, inputs = _setup(config, overrides, model, image, prompt, device)
    with torch.no_grad(), pipe.attach(lvlm, processor) as attached:
        if pipe.llm_stages:
            lvlm(**inputs)  # one prefill: the stages inside the LLM run in it
        else:
            attached.prune(inputs)
        stages = attached.kept_by_stage()
    if len(stages) > 1:
        overlay_stages(img, [(where, sels[0]) for where, sels in stages], processor=processor, path=out)
    else:
        overlay_selection(img, stages[0][1][0], processor=processor, path=out)
    if len(stages) > 1:
        kept = "; ".join(f"{where}: {sels[0].k} of {sels[0].n}" for where, sels in stages)
        print_fn(f"kept visual tokens ({kept}); overlay: {Path(out).resolve()}")
    else:
        sel = stages[0][1][0]
        print_fn(f"kept {sel.k} of {sel.n} visual tokens; overlay: {Path(out).resolve()}")
    return Path(out).resolve()
