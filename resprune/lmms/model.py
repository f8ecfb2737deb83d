"""The ``resprune`` model of lmms-eval: any supported checkpoint, pruned by any pipeline.

lmms-eval hands the model batches of requests; this module renders each one with the
checkpoint's own chat template, prunes and generates with ``pipeline.attach`` (the model's own
``generate``), and records per request the visual tokens kept, the prefill FLOPs (Eq. 18)
before and after, the KV cache and the selection time. The per-request prompt length the LLM
ran on goes to lmms-eval as ``token_counts.input_tokens`` (its efficiency summary); the means
go to lmms-eval's ``throughput`` block as ``avg_resprune.<metric>.<key>`` (e.g.
``avg_resprune.flops.ratio``), which ``resprune report`` reads back.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.protocol import ChatMessages
from PIL import Image
from tqdm import tqdm

from ..costs import LLMDims, kv_cache_bytes, llm_dims, prefill_flops
from ..errors import ConfigError, InvalidInputError, ResPruneError
from ..injection import config_image_token_id
from ..models import load_model, render_chats
from ..pipeline import Pipeline, load_pipeline
from ..prompts import tokenizer_of
from ..video import VIDEO_SUFFIXES, Video, read_video_file, render_media_chats, require_videos
from . import MODEL_ARGS, NO_PRUNING, STATS_PREFIX, parse_model_args

__all__ = ["ResPrune", "ResPruneSimple", "Request", "RequestStats"]

@dataclass
class Request:
    """One request, ready for the processor: the chat ``messages`` (images as
    ``{"type": "image"}``, videos as ``{"type": "video"}``), the ``images`` (PIL images and
    ``resprune.video.Video`` clips) in order, the task and the generation settings."""

    messages: list[dict[str, Any]]
    images: list[Image.Image | Video]
    task: str
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    continuation: str | None = None  # loglikelihood requests


@dataclass
class RequestStats:
    """What pruning did to one request (token counts are the prompt's, visual and text)."""

    visual: int
    visual_kept: int
    prompt_full: int
    schedule: list[tuple[int, int]]
    selection_ms: float | None


def _under_lmms_eval_cli() -> bool:
    """Whether this process is ``python -m lmms_eval`` (which turns exceptions into a log line)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "lmms_eval.__main__"


class ResPrune(lmms):
    """``--model resprune``: lmms-eval's chat interface (``doc_to_messages``).

    Args:
        pretrained: a hub id, a local checkpoint folder, or ``tiny:<model_type>[:layers]``.
        pipeline: a shipped config name or a YAML path; ``none`` runs the unpruned model.
        device: ``cuda`` (``cuda:<LOCAL_RANK>`` under ``accelerate launch``), ``cpu``, ...;
            default: CUDA when there is one.
        dtype: ``auto`` (the checkpoint's), ``bfloat16``, ``float16``, ``float32``.
        batch_size: prompts per ``generate`` call (left-padded).
        seed: the seed of a tiny model's random weights.
        max_frames: frames read from each video file, spread evenly over it (lmms-eval's own
            sampling; Qwen2.5-VL and LLaVA-OneVision take videos).
        **overrides: dotlist overrides of the pipeline config (``budget=64``).
    """

    is_simple = False
    gen_kwargs_arg = 2
    """Where a generation request's ``generation_kwargs`` sit in its arguments."""

    def __init__(self, pretrained: str = "llava-hf/llava-1.5-7b-hf", pipeline: str = "resprune-llava15",
                 device: str | None = None, dtype: str = "auto", batch_size: int | str = 1,
                 max_batch_size: int | None = None, seed: int = 0, max_frames: int | str = 32,
                 **overrides: Any) -> None:
        super().__init__()
        try:
            self.max_frames = _positive_int(max_frames, "max_frames")
            self._setup(pretrained, pipeline, device, dtype, batch_size, seed, overrides)
        except ResPruneError as exc:
            if _under_lmms_eval_cli():
                # `python -m lmms_eval` logs an exception raised here and exits 0, so a misspelt
                # model_args key would skip the evaluation in silence: stop the process instead
                print(f"resprune: error: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
            raise

    def _setup(self, pretrained: str, pipeline: str, device: str | None, dtype: str, batch_size: int | str, seed: int,
               overrides: dict[str, Any]) -> None:
        _, dotlist = parse_model_args(overrides)
        self.batch_size_per_gpu = _positive_int(batch_size, "batch_size")
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.pipeline_name = str(pipeline)
        self.pipeline = _pipeline(self.pipeline_name, dotlist)
        self._model, self.processor = load_model(str(pretrained), device=_device(device), dtype=str(dtype),
                                                 seed=int(seed))
        self.tokenizer = tokenizer_of(self.processor)
        self.dims: LLMDims = llm_dims(self._model.config)
        self.image_token_id = config_image_token_id(self._model.config)
        video = getattr(self._model.config, "video_token_id", None)
        self.placeholder_ids = [t for t in (self.image_token_id, video) if t is not None]
        self.attached = None
        if self.pipeline is not None:
            self.attached = self.pipeline.attach(self._model, self.processor)
            self.attached.profile = True  # selection time, synchronised on a GPU

    # --- what lmms-eval reads ------------------------------------------------------------

    @property
    def model(self) -> Any:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._model.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # --- requests ----------------------------------------------------------------------

    def request(self, instance: Instance) -> Request:
        """A chat request: ``(context, doc_to_messages, gen_kwargs, doc_id, task, split)``."""
        _, doc_to_messages, gen_kwargs, doc_id, task, split = instance.args
        messages = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
        turns, images = [], []
        for message in messages.messages:
            content: list[dict[str, Any]] = []
            for part in message.content:
                if part.type == "text":
                    content.append({"type": "text", "text": part.text})
                elif part.type == "image":
                    content.append({"type": "image"})
                    images.append(_image(part.url, task))
                elif part.type == "video":
                    content.append({"type": "video"})
                    images.append(self._video(part.url, task))
                else:
                    raise InvalidInputError(f"lmms-eval task '{task}': a {part.type} input; resprune prunes the "
                                            "visual tokens of images and videos (audio is not supported).")
            turns.append({"role": message.role, "content": content})
        return Request(turns, images, task, dict(gen_kwargs or {}))

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Greedy (or sampled) answers, batched by generation settings, longest prompts first;
        a batch's images are opened when the batch runs."""
        results: list[GenerationResult | None] = [None] * len(requests)
        stats: list[RequestStats] = []
        elapsed, new_tokens = 0.0, 0
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="resprune generating")
        for batch in _batches([r.args[0] for r in requests], [r.args[self.gen_kwargs_arg] for r in requests],
                              self.batch_size_per_gpu):
            answers, counts, batch_stats, seconds = self._generate([self.request(requests[i]) for i in batch])
            for i, answer, count, st in zip(batch, answers, counts, batch_stats, strict=True):
                results[i] = GenerationResult(text=answer, token_counts=TokenCounts(
                    input_tokens=st.schedule[0][1], output_tokens=count))
            stats += batch_stats
            elapsed += seconds
            new_tokens += sum(counts)
            bar.update(len(batch))
        bar.close()
        self._log(stats, elapsed, new_tokens)
        return [r for r in results if r is not None]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("resprune's chat model generates; for loglikelihood tasks run lmms-eval "
                                  "with --force_simple (the simple resprune model scores continuations).")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("resprune: multi-round generation is not supported.")

    # --- the work ------------------------------------------------------------------------

    def inputs(self, items: Sequence[Request], suffixes: Sequence[str] | None = None) -> Any:
        """The processor's left-padded batch of ``items`` (chat template, generation prompt
        appended, then ``suffixes`` if given), on the model's device and dtype."""
        media = [im for it in items for im in it.images]
        if self.pipeline is not None:
            media = self.pipeline.prepare_images(media, self.processor)  # downsampling resizes before the processor
        render = render_media_chats if any(isinstance(m, Video) for m in media) else render_chats
        return render(self.processor, [it.messages for it in items], media,
                      suffixes=None if suffixes is None else list(suffixes), device=self._model.device,
                      dtype=self._model.dtype)

    def _video(self, value: Any, task: str) -> Video:
        """A task's video (a file path, as lmms-eval's video tasks give them), ``max_frames`` frames of
        it; refused on a backbone without videos."""
        require_videos(self._model, str(getattr(self._model.config, "_name_or_path", "")),
                       f"lmms-eval task '{task}' (a video)")
        if isinstance(value, Video):
            return value
        if isinstance(value, (str, os.PathLike)):
            return read_video_file(value, self.max_frames)
        raise InvalidInputError(f"lmms-eval task '{task}': expected a video file path from the task, got "
                                f"{type(value).__name__}.")

    def _generate(self, items: list[Request]) -> tuple[list[str], list[int], list[RequestStats], float]:
        settings = _generation_settings(items[0].gen_kwargs, self.tokenizer)
        until = settings.pop("until")
        inputs = self.inputs(items)
        calls = self.attached.calls if self.attached is not None else 0
        start = time.perf_counter()
        with torch.inference_mode():
            out = self._model.generate(**inputs, **settings)
        seconds = time.perf_counter() - start
        new = out[:, inputs["input_ids"].shape[1]:]
        answers, counts = [], []
        pad = settings.get("pad_token_id")
        for row in new:
            ids = row[row != pad] if pad is not None else row
            answers.append(_cut(self.tokenizer.decode(ids, skip_special_tokens=True), until))
            counts.append(int(ids.numel()))
        return answers, counts, self._stats(inputs, calls), seconds

    def _stats(self, inputs: Any, calls_before: int) -> list[RequestStats]:
        """Per prompt of the call: visual tokens in and kept, the prompt's token schedule."""
        mask = inputs["attention_mask"]
        full = mask.sum(dim=1).tolist()
        rows = len(full)
        pruned = self.attached is not None and self.attached.calls > calls_before
        if not pruned:  # no pruning (pipeline=none, or a prompt without images)
            ids = inputs["input_ids"]
            placeholders = torch.tensor(self.placeholder_ids, device=ids.device)
            visual = (torch.isin(ids, placeholders) & mask.bool()).sum(dim=1).tolist()
            return [RequestStats(v, v, t, [(0, t)], None) for v, t in zip(visual, full)]
        batch = self.attached.last
        per_row_ms = None if batch.prune_ms is None else batch.prune_ms / rows
        stages = [(0, batch.selections)] + [(rec.layer, rec.selections) for rec in batch.stages]
        out = []
        for r in range(rows):
            visual = sum(s.n for s in batch.selections if s.row == r)
            kept = [sum(s.k for s in sels if s.row == r) for _, sels in stages]
            schedule = [(layer, full[r] - (visual - k)) for (layer, _), k in zip(stages, kept)]
            out.append(RequestStats(visual, kept[-1], full[r], schedule, per_row_ms))
        return out

    def _log(self, stats: list[RequestStats], seconds: float, new_tokens: int) -> None:
        """The means of ``stats`` into lmms-eval's throughput summary (one entry per call)."""
        if not stats:
            return
        log_metrics(total_elapsed_time=seconds, total_gen_tokens=new_tokens,
                    avg_speed=new_tokens / seconds if seconds > 0 else 0.0,
                    additional_metrics={STATS_PREFIX + k: v for k, v in summarize(stats, self.dims).items()})

    def clean(self) -> None:
        if self.attached is not None:
            self.attached.remove()
        super().clean()


class ResPruneSimple(ResPrune):
    """``--model resprune --force_simple``: lmms-eval's simple interface (``doc_to_visual`` and
    the context string); also scores continuations (loglikelihood tasks)."""

    is_simple = True
    gen_kwargs_arg = 1

    def request(self, instance: Instance) -> Request:
        """A simple request: ``(context, gen_kwargs | target, doc_to_visual, doc_id, task, split)``."""
        context, second, doc_to_visual, doc_id, task, split = instance.args
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        images = [self._video(v, task) if _is_video(v) else _image(v, task) for v in _flat(visuals)]
        text = context.replace("<image>", " ").replace("<video>", " ").strip() if images else context
        content = [{"type": "video" if isinstance(m, Video) else "image"} for m in images] + [
            {"type": "text", "text": text}]
        req = Request([{"role": "user", "content": content}], images, task)
        if instance.request_type == "loglikelihood":
            req.continuation = second if isinstance(second, str) else second(doc)
        else:
            req.gen_kwargs = dict(second or {})
        return req

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(log p(continuation | prompt), whether greedy decoding gives it)`` per request, the
        prompt pruned like a generation's."""
        out: list[tuple[float, bool]] = []
        stats: list[RequestStats] = []
        start = time.perf_counter()
        for instance in tqdm(requests, disable=self.rank != 0, desc="resprune scoring"):
            item = self.request(instance)
            prompt_len = self.inputs([item])["input_ids"].shape[1]
            inputs = self.inputs([item], [item.continuation or ""])
            n = inputs["input_ids"].shape[1] - prompt_len
            if n <= 0:
                raise InvalidInputError(f"lmms-eval task '{item.task}': an empty continuation to score.")
            calls = self.attached.calls if self.attached is not None else 0
            with torch.inference_mode():
                logits = self._model(**inputs).logits
            logp = torch.log_softmax(logits[0, -n - 1:-1].float(), dim=-1)
            target = inputs["input_ids"][0, -n:]
            out.append((float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
            stats += self._stats(inputs, calls)
        self._log(stats, time.perf_counter() - start, 0)
        return out


# --- helpers -----------------------------------------------------------------------------


def summarize(stats: Sequence[RequestStats], dims: LLMDims) -> dict[str, float]:
    """Means over requests, keyed like resprune's sweep metrics: ``tokens.visual``,
    ``tokens.visual_kept``, ``tokens.prompt``, ``flops.prefill_tflops``, ``flops.ratio``,
    ``kv_cache.mib``, ``latency.selection_ms`` (when measured), and ``requests``."""
    n = len(stats)
    flops = [prefill_flops(dims, s.schedule) for s in stats]
    full = [prefill_flops(dims, s.prompt_full) for s in stats]
    out = {"tokens.visual": sum(s.visual for s in stats) / n,
           "tokens.visual_kept": sum(s.visual_kept for s in stats) / n,
           "tokens.prompt": sum(s.schedule[0][1] for s in stats) / n,
           "flops.prefill_tflops": sum(flops) / n / 1e12,
           "flops.ratio": sum(f / g for f, g in zip(flops, full) if g) / n,
           "kv_cache.mib": sum(kv_cache_bytes(dims, s.schedule) for s in stats) / n / 2**20,
           "requests": float(n)}
    timed = [s.selection_ms for s in stats if s.selection_ms is not None]
    if timed:
        out["latency.selection_ms"] = sum(timed) / len(timed)
    return out


def _pipeline(name: str, overrides: list[str]) -> Pipeline | None:
    if name == NO_PRUNING:
        if overrides:
            raise ConfigError(f"model_args: pipeline=none runs the unpruned model; drop the overrides {overrides}.")
        return None
    try:
        return load_pipeline(name, overrides)
    except ConfigError as exc:
        raise ConfigError(f"model_args of lmms-eval model 'resprune' (model arguments: {', '.join(MODEL_ARGS)}; "
                          f"every other key overrides pipeline '{name}'): {exc}") from exc


def _device(device: str | None) -> str:
    """``cuda:<LOCAL_RANK>`` for ``cuda`` or nothing when CUDA is there (one process per GPU
    under ``accelerate launch``); otherwise what was asked, or ``cpu``."""
    if device in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device or "cpu"


def _positive_int(value: Any, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise ConfigError(f"lmms-eval model 'resprune': {name}={value!r} must be a positive integer "
                          "('auto' batch sizes are not supported).")
    return number


def _image(value: Any, task: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    raise InvalidInputError(f"lmms-eval task '{task}': expected PIL images or video file paths from the task, got "
                            f"{type(value).__name__} (audio is not supported).")


def _is_video(value: Any) -> bool:
    """A video file path (what lmms-eval's video tasks' ``doc_to_visual`` returns) or a clip."""
    return isinstance(value, Video) or (isinstance(value, (str, os.PathLike))
                                        and os.fspath(value).lower().endswith(VIDEO_SUFFIXES))


def _flat(values: Any) -> list[Any]:
    out: list[Any] = []
    for v in values or []:
        out.extend(_flat(v) if isinstance(v, (list, tuple)) else [v])
    return out


def _batches(contexts: Sequence[str], gen_kwargs: Sequence[Any], size: int) -> list[list[int]]:
    """Request indices in batches of ``size`` that share generation settings, longest contexts
    first (a batch pads to its longest prompt; running out of memory shows in the first batch)."""
    settings = [repr(sorted((g or {}).items())) for g in gen_kwargs]
    out: list[list[int]] = []
    for i in sorted(range(len(contexts)), key=lambda i: (settings[i], -len(str(contexts[i])))):
        if out and len(out[-1]) < size and settings[out[-1][0]] == settings[i]:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _generation_settings(gen_kwargs: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """lmms-eval's ``generation_kwargs`` as ``generate`` arguments (greedy unless
    ``temperature`` > 0; 1024 new tokens unless the task says), ``until`` kept aside."""
    gk = dict(gen_kwargs)
    until = gk.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    temperature = float(gk.pop("temperature", 0) or 0)
    sample = temperature > 0
    top_p = gk.pop("top_p", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    return {"until": until, "max_new_tokens": int(gk.pop("max_new_tokens", 1024)), "do_sample": sample,
            "temperature": temperature if sample else None, "top_p": top_p if sample else None,
            "num_beams": int(gk.pop("num_beams", 1) or 1), "pad_token_id": pad if pad is not None else eos,
            "use_cache": True}


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first stop string of ``until``."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text

