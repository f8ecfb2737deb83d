"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import platform
from collections.abc import Callable

import torch

from resprune.timing import clock, median_ms


def sync(device: torch.device) -> None:
    clock(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in milliseconds, after ``warmup`` untimed calls."""
    return median_ms(fn, device, repeats=repeats, warmup=warmup)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def emit(table: str, path: str | None) -> None:
    """Print a markdown table, and also write it to ``path`` when given."""
    print(table)
    if path:
        with open(path, "w") as fh:
            fh.write(table + "\n")
