"""Wall-clock timing that is right on a GPU: synchronise before reading the clock."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["clock", "median_ms"]


def clock(device: torch.device | str | None = None) -> float:
    """``time.perf_counter()`` after the work queued on ``device`` (if CUDA) has finished."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def median_ms(fn: Callable[[], Any], device: torch.device | str | None = None, *, repeats: int = 3,
              warmup: int = 1) -> float:
    """Median wall time of ``fn`` in milliseconds over ``repeats`` calls, after ``warmup``
    untimed calls (first-call costs such as kernel compilation are not the call's time)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock(device)
        fn()
        times.append((clock(device) - start) * 1e3)
    return statistics.median(times)
