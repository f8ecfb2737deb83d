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
from .runfiles import writable_image
from .visualize import overlay_selection, overlay_stages

__all__ = ["run_one", "visualize_one"]


def _visualize_video(config: str, overrides: Iterable[str], *, model: str, video: str, prompt: str,
                     device: str | None, out: str | Path, print_fn: Callable[[str], Any]) -> Path:
    from .video import frame_counts, load_video, require_videos, video_chat_inputs
    from .visualize import overlay_video

    clip = load_video(video)
    pipe = load_pipeline(config, list(overrides))
    lvlm, processor = load_model(model, device=device)
    require_videos(lvlm, model, "--video")
    inputs = video_chat_inputs(processor, [[clip]], [prompt], device=lvlm.device)
    with torch.no_grad(), pipe.attach(lvlm, processor) as attached:
        attached.prune(inputs)
        (sel,) = attached.selections
    overlay_video(clip.frames, sel, path=out)
    print_fn(f"{_per_frame(sel, len(clip.frames))}; contact sheet: {Path(out).resolve()}")
    return Path(out).resolve()


def _per_frame(sel: Any, frames: int) -> str:
    """What a video's selection kept, frame by frame (Qwen2.5-VL: frame pair by frame pair)."""
    from .video import frame_counts

    t, (rows, cols) = sel.geometry.layout["temporal"], sel.geometry.layout["grid"]
    unit = "frame pair" if t < frames else "frame"
    return (f"kept {sel.k} of the video's {sel.n} tokens ({frames} frames, {t} {unit}s of {rows}x{cols}); "
            f"per {unit} {frame_counts(sel)}")


def _setup(config: str, overrides: Iterable[str], model: str, image: str | Path | None, prompt: str,
           device: str | None, video: str | None = None) -> tuple[Pipeline, Any, Any, Any, Any]:
    """The pipeline, model, processor, the image (or ``Video``) and the model's inputs."""
    from .video import load_video, require_videos, video_chat_inputs

    pipe = load_pipeline(config, list(overrides))
    clip = load_video(video) if video is not None else None  # a bad video fails before the model loads
    lvlm, processor = load_model(model, device=device)
    if clip is not None:
        require_videos(lvlm, model, "--video")
        return pipe, lvlm, processor, clip, video_chat_inputs(processor, [[clip]], [prompt], device=lvlm.device)
    img = open_image(str(image))
    inputs = chat_inputs(processor, pipe.prepare_images([img], processor), [prompt], device=lvlm.device)
    return pipe, lvlm, processor, img, inputs


def run_one(config: str, overrides: Iterable[str] = (), *, model: str, image: str | Path | None = None,
            prompt: str, max_new_tokens: int = 64, device: str | None = None, out: str | Path | None = None,
            compare: bool = False, video: str | None = None,
            print_fn: Callable[[str], Any] = print) -> dict[str, Any]:
    """Prune with ``config`` and generate an answer; print it with the token counts and FLOPs.
    ``video`` (a file, a folder of frames or a demo clip) instead of ``image``: the overlay is a
    contact sheet.

    Returns the answer, the selections and, under ``summary``, what is printed as plain JSON
    values (``resprune run --json``): the kept indices, counts entering and kept, merged tokens
    per stage and image, the token schedule and the FLOPs."""
    if out is not None:
        writable_image(out, "--out")  # before any model work
    pipe, lvlm, processor, img, inputs = _setup(config, overrides, model, image, prompt, device, video)
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
    kept_records = []
    entering: dict[int, int] = {}  # image -> tokens entering its next stage
    for where, sels in stages:
        for sel in sels:
            before = entering.get(sel.image, sel.n)
            of = f"the {before} visual tokens" + (f" entering it ({sel.n} in the image)" if before != sel.n else "")
            merged = f"; {sel.merged} of them merged from dropped tokens" if sel.merged else ""
            print_fn(f"{where} stage, image {sel.image}: kept {sel.k} of {of}{merged}")
            kept_records.append({"stage": where, "image": sel.image, "entering": before, "image_tokens": sel.n,
                                 "kept": sel.k, "merged": sel.merged, "indices": sel.kept.tolist()})
            if video is not None and where == "input" and sel.geometry.layout.get("kind") == "video":
                from .video import frame_counts

                print_fn(_per_frame(sel, len(img.frames)))
                kept_records[-1]["per_frame"] = frame_counts(sel)
            entering[sel.image] = sel.k
    after = " -> ".join(f"{t} (layer {layer}+)" if layer else str(t) for layer, t in schedule)
    flops = (prefill_flops(dims, t_full), prefill_flops(dims, schedule))
    print_fn(f"prompt tokens {t_full} -> {after}; prefill FLOPs (Eq. 18) {flops[0]:.3g} -> {flops[1]:.3g}; "
             f"generate {seconds:.2f} s")
    tower = batch.tower_schedule
    vflops = None
    if len(tower) > 1:  # stages inside the vision tower
        vdims = vision_dims(lvlm.config)
        shrunk = " -> ".join(f"{t} (vision layer {layer}+)" for layer, t in tower[1:])
        vflops = (vision_flops(vdims, tower[0][1], batch.tower_tiles), vision_flops(vdims, tower, batch.tower_tiles))
        print_fn(f"vision tower tokens {tower[0][1]} -> {shrunk}; vision FLOPs {vflops[0]:.3g} -> {vflops[1]:.3g}")
    print_fn(f"answer: {answer}")
    result: dict[str, Any] = {"answer": answer, "selections": selections, "stages": batch.stages,
                              "tokens_full": t_full, "tokens_pruned": t_pruned, "token_schedule": schedule,
                              "tower_schedule": tower, "seconds": seconds,
                              "summary": {"answer": answer, "kept": kept_records, "prompt_tokens": t_full,
                                          "token_schedule": [list(x) for x in schedule],
                                          "prefill_flops": {"full": flops[0], "pruned": flops[1]},
                                          "tower_schedule": [list(x) for x in tower],
                                          "vision_flops": None if vflops is None
                                          else {"full": vflops[0], "pruned": vflops[1]},
                                          "generate_s": seconds}}
    if compare:
        with torch.no_grad():
            full = lvlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        result["answer_full"] = tokenizer.decode(full[0, prompt_len:], skip_special_tokens=True)
        result["summary"]["answer_full"] = result["answer_full"]
        print_fn(f"answer without pruning: {result['answer_full']}")
    if out is not None:
        if video is not None:
            from .visualize import overlay_video

            overlay_video(img.frames, selections[0], path=out)
        elif len(stages) > 1:
            overlay_stages(img, [(where, sels[0]) for where, sels in stages], processor=processor, path=out)
        else:
            overlay_selection(img, selections[0], processor=processor, path=out)
        print_fn(f"overlay: {Path(out).resolve()}")
        result["overlay"] = Path(out).resolve()
        result["summary"]["overlay"] = str(result["overlay"])
    return result


def visualize_one(config: str, overrides: Iterable[str] = (), *, model: str, image: str | Path | None = None,
                  video: str | None = None, prompt: str = "Describe the picture.", device: str | None = None,
                  out: str | Path = "resprune-overlay.png", print_fn: Callable[[str], Any] = print) -> Path:
    """Write the kept-token overlay (no generation: only the vision tower and selection run); for
    a ``video`` (a folder of frames or a demo clip, ``resprune.video.load_video``) a contact sheet."""
    writable_image(out, "--out")  # before any model work
    if video is not None:
        return _visualize_video(config, overrides, model=model, video=video, prompt=prompt, device=device, out=out,
                                print_fn=print_fn)
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
