"""Uniform selection: evenly spread over the spatial grid when known, else over the sequence."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.interfaces import Selector


def grid_points(rows: int, cols: int, k: int) -> list[int]:
    """``k`` distinct raster indices of a ``rows x cols`` grid, spread like a sub-grid.

    An ``r x c`` lattice with ``r * c >= k`` and about the grid's aspect ratio is placed at
    cell centres; if it has more than ``k`` points, ``k`` of them are taken evenly.
    """
    r = min(rows, max(1, round(math.sqrt(k * rows / cols))))
    c = min(cols, math.ceil(k / r))
    if r * c < k:
        r = min(rows, math.ceil(k / c))
    ys = [int((i + 0.5) * rows / r) for i in range(r)]
    xs = [int((j + 0.5) * cols / c) for j in range(c)]
    lattice = [y * cols + x for y in ys for x in xs]
    return [lattice[int((i + 0.5) * len(lattice) / k)] for i in range(k)]


class UniformSelector(Selector):
    """Spatially uniform tokens (context ``grid``), else evenly spaced sequence positions."""

    name = "uniform"
    description = "evenly spread over the spatial grid (or the sequence)"

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        b, n, _ = tokens.shape
        grid = context.maybe("grid")
        if grid is not None and grid[0] * grid[1] == n:
            picks = grid_points(int(grid[0]), int(grid[1]), k)
        else:
            picks = [int((i + 0.5) * n / k) for i in range(k)]
        return torch.tensor(picks, dtype=torch.long, device=tokens.device).expand(b, k).contiguous()


@hookimpl
def resprune_register_selectors(register):
    register(UniformSelector)
