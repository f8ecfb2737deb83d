"""Average pooling of each image's token grid down to the budget: the simplest baseline.

``selector: pool`` (its stage runs ``merger: pool`` unless the config names a merger; shipped
config ``pool``) splits each image's grid into
exactly ``k`` rectangular cells and replaces every cell by one token at the place of its centre
token (so M-RoPE and the sequence see the centre's position). The grid is cut into ``r`` bands of
rows (``r`` near ``sqrt(k * rows / cols)``, the grid's aspect) and band ``i`` into
``floor((i+1) k / r) - floor(i k / r)`` runs of columns. When the grid divides evenly this is
plain ``s x s`` pooling: LLaVA-1.5's 24x24 grid at ``k = 64`` is 3x3 pooling, at ``k = 144``
2x2 pooling; other budgets give cells of two neighbouring sizes, so every method of a table
keeps the same token count.

Grids come from the context's ``positions`` (``grid`` supplies them on LLaVA-1.5, Qwen2.5-VL's
``grid_thw`` after the 2x2 merge, ...): LLaVA-NeXT's base image and its (unpadded) crop grid
are pooled separately, a video per frame, with the budget split over them in proportion to
their token counts. Tokens without a position (LLaVA-NeXT's row newlines) are dropped, or kept
after every grid token when the budget has room for more than the grid tokens.

The merger's ``mode`` says how a cell becomes a token: ``mean`` (average pooling) or
``bilinear`` (the grid sampled where ``F.interpolate(mode="bilinear", align_corners=False)``
samples it, ``band_centres``: where the bands hold equal counts, exactly that resampling, as
LLaVA-OneVision pools its video frames, 27x27 to 14x14).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.errors import InvalidInputError, PluginContractError
from resprune.image_selection import proportional_shares
from resprune.interfaces import Merger, Selector
from resprune.params import check_choice

__all__ = ["PoolPlan", "pool_plan", "band_cells", "band_centres", "PoolSelector", "PoolMerger"]


def _bands(rows: int, cols: int, k: int) -> list[int]:
    """How many cells each band of rows holds: ``r`` bands (``r`` near ``sqrt(k * rows / cols)``),
    band ``i`` ``floor((i+1) k / r) - floor(i k / r)`` of them."""
    if not 1 <= k <= rows * cols:
        raise ValueError(f"band_cells: k={k} cells of a {rows}x{cols} grid")
    r = min(rows, k, max(math.ceil(k / cols), round(math.sqrt(k * rows / cols))))
    return [(i + 1) * k // r - i * k // r for i in range(r)]


def band_cells(rows: int, cols: int, k: int) -> list[tuple[int, int, int, int]]:
    """``k`` rectangles ``(row0, row1, col0, col1)`` (ends exclusive) that tile a ``rows x cols``
    grid in raster order: ``r`` bands of rows, band ``i`` cut into ``floor((i+1) k / r) - floor(i k / r)``
    runs of columns (``1 <= k <= rows * cols``)."""
    bands = _bands(rows, cols, k)
    r = len(bands)
    return [(i * rows // r, (i + 1) * rows // r, j * cols // count, (j + 1) * cols // count)
            for i, count in enumerate(bands) for j in range(count)]


def band_centres(rows: int, cols: int, k: int) -> list[tuple[float, float]]:
    """Where ``F.interpolate(mode="bilinear", align_corners=False)`` samples a ``rows x cols`` grid
    for each of the ``k`` cells of ``band_cells``, in token units: band ``i`` of ``r`` at row
    ``(i + 0.5) rows / r - 0.5``, its cell ``j`` of ``c`` at column ``(j + 0.5) cols / c - 0.5``."""
    bands = _bands(rows, cols, k)
    r = len(bands)
    return [((i + 0.5) * rows / r - 0.5, (j + 0.5) * cols / count - 0.5)
            for i, count in enumerate(bands) for j in range(count)]


@dataclass(frozen=True)
class PoolPlan:
    """How ``n`` tokens pool into ``k``: ``places`` int64 ``[k]`` ascending, the token whose place
    each pooled token takes; ``owner`` int64 ``[n]``, the pooled token (index into ``places``)
    each token averages into (a kept token of no grid: its own; -1: a dropped one); ``sizes``
    float ``[k]``, the tokens each pooled token averages; ``corners`` int64 ``[k, 4]`` and
    ``weights`` float ``[k, 4]``: the bilinear sample of each cell (``band_centres``; a token kept as it
    is: itself with weight 1)."""

    places: Tensor
    owner: Tensor
    sizes: Tensor
    corners: Tensor
    weights: Tensor

    @property
    def members(self) -> Tensor | None:
        """The tokens that enter a pooled token, or ``None`` when every token does."""
        return None if bool((self.owner >= 0).all()) else (self.owner >= 0).nonzero().squeeze(1)


def _regions(context: PruneContext, n: int, who: str) -> tuple[Tensor, Tensor]:
    """Per token, ``(row, col)`` positions ``[n, 2]`` and a region id (-1: no grid): the base image,
    the crops and each frame are separate grids."""
    positions = context.get("positions", requester=who)
    positions = torch.as_tensor(positions, dtype=torch.float32).cpu()
    if positions.shape != (n, 2):
        raise InvalidInputError(f"{who}: context 'positions' has shape {tuple(positions.shape)} for {n} tokens; "
                                f"expected [{n}, 2].")
    region = torch.zeros(n, dtype=torch.long)
    tiles = context.maybe("tiles")
    if tiles is not None:
        tiles = torch.as_tensor(tiles).cpu().long()
        region = torch.where(tiles > 0, 1, 0)  # LLaVA-NeXT: the base image, then the crops as one grid
        region[tiles < 0] = -1
    frames = context.maybe("frames")
    if frames is not None:
        frames = torch.as_tensor(frames).cpu().long()
        region = torch.where(region >= 0, region + 2 * frames, region)
    region[torch.isnan(positions).any(1)] = -1
    return positions, region


_PLANS: OrderedDict[tuple[int, int, bytes, bytes], PoolPlan] = OrderedDict()
_CACHED = 64


def pool_plan(context: PruneContext, n: int, k: int, *, who: str = "pool") -> PoolPlan:
    """The cells of ``n`` tokens pooled into ``k`` (``1 <= k <= n``), from the context's positions
    (the selector's plan is the merger's: the last few are kept, keyed by the geometry)."""
    positions, region = _regions(context, n, who)
    key = (n, k, positions.numpy().tobytes(), region.numpy().tobytes())
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _plan(positions, region, n, k, who)
        while len(_PLANS) > _CACHED:
            _PLANS.popitem(last=False)
    return plan


def _plan(positions: Tensor, region: Tensor, n: int, k: int, who: str) -> PoolPlan:
    ids = [int(r) for r in torch.unique(region) if r >= 0]
    grids = []
    for rid in ids:
        members = (region == rid).nonzero().squeeze(1)
        rows = torch.unique(positions[members, 0])
        cols = torch.unique(positions[members, 1])
        if rows.numel() * cols.numel() != members.numel():
            raise InvalidInputError(
                f"{who}: the {members.numel()} tokens of one grid (region {rid}) have {rows.numel()} distinct rows and "
                f"{cols.numel()} distinct columns: not a full grid, so they cannot be pooled (tokens pruned earlier, "
                f"inside the vision tower or the LLM, leave holes; put the pool stage first).")
        index = torch.full((rows.numel(), cols.numel()), -1, dtype=torch.long)
        index[torch.searchsorted(rows, positions[members, 0]), torch.searchsorted(cols, positions[members, 1])] = members
        grids.append(index)
    loose = (region < 0).nonzero().squeeze(1).tolist()
    spatial = sum(g.numel() for g in grids)
    shares = proportional_shares(min(k, spatial), [float(g.numel()) for g in grids], [g.numel() for g in grids])
    places, owner = [], torch.full((n,), -1, dtype=torch.long)
    corners, weights = [], []
    for grid, share in zip(grids, shares):
        if share == 0:
            continue
        rows, cols = grid.shape
        for (r0, r1, c0, c1), (y, x) in zip(band_cells(rows, cols, share), band_centres(rows, cols, share)):
            owner[grid[r0:r1, c0:c1].reshape(-1)] = len(places)
            places.append(int(grid[(r0 + r1 - 1) // 2, (c0 + c1 - 1) // 2]))
            y0, x0 = math.floor(y), math.floor(x)
            y1, x1 = min(y0 + 1, rows - 1), min(x0 + 1, cols - 1)
            wy, wx = y - y0, x - x0
            corners.append([int(grid[y0, x0]), int(grid[y0, x1]), int(grid[y1, x0]), int(grid[y1, x1])])
            weights.append([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx])
    for j in loose[: max(k - len(places), 0)]:  # room left after every grid token: tokens of no grid, in order
        owner[j] = len(places)
        places.append(j)
        corners.append([j] * 4)
        weights.append([1.0, 0.0, 0.0, 0.0])
    if len(places) != k:
        raise InvalidInputError(f"{who}: {k} tokens asked of {n}, of which only {len(places)} can be pooled.")
    order = torch.tensor(places).argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k)
    owner = torch.where(owner >= 0, rank[owner.clamp_min(0)], owner)
    sizes = torch.bincount(owner[owner >= 0], minlength=k).float()
    return PoolPlan(torch.tensor(places)[order], owner, sizes, torch.tensor(corners)[order],
                    torch.tensor(weights, dtype=torch.float32)[order])


class PoolSelector(Selector):
    """The centre token of each of ``k`` pooled cells (with ``merger: pool``: average pooling)."""

    name = "pool"
    description = "average pooling of each image's grid to the budget (with merger 'pool'): centres of the cells"
    requires = frozenset({"positions"})
    default_merger = "pool"

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        b, n, _ = tokens.shape
        plan = pool_plan(context, n, k, who=f"selector '{self.name}'")
        return plan.places.to(tokens.device).expand(b, k).clone()  # the plan is cached: hand out a copy


class PoolMerger(Merger):
    """Each pooled cell's tokens made into one token at its centre's place (after ``selector: pool``)."""

    name = "pool"
    description = "average pooling: each cell of selector 'pool' becomes its mean (or F.interpolate's bilinear sample)"
    requires = frozenset({"positions"})
    selector = "pool"

    @dataclass
    class Params:
        mode: str = "mean"
        """`mean`: the average of the cell's tokens (2x2 / 3x3 average pooling where the grid divides);
        `bilinear`: the grid sampled where `F.interpolate(mode="bilinear")` samples it (LLaVA-OneVision's
        pooling)."""

        def __post_init__(self) -> None:
            check_choice("mode", self.mode, ("mean", "bilinear"))

    def merge(self, tokens: Tensor, kept: Tensor, slots: int, scores: Mapping[str, Tensor],
              context: PruneContext) -> tuple[Tensor, Tensor]:
        b, n, d = tokens.shape
        k = kept.shape[1]
        plan = pool_plan(context, n, k, who=f"merger '{self.name}'")
        places = plan.places.to(tokens.device)
        if not bool((kept == places).all()):
            raise PluginContractError(f"merger '{self.name}': the kept tokens are not the centres of the {k} cells "
                                      f"selector 'pool' keeps.")
        if self.params.mode == "bilinear":
            corners = plan.corners.to(tokens.device)
            weights = plan.weights.to(tokens.device, tokens.dtype)
            picked = tokens[:, corners.reshape(-1)].view(b, k, 4, d)
            return kept, (picked * weights[None, :, :, None]).sum(2)
        owner, members = plan.owner.to(tokens.device), plan.members
        if members is not None:  # dropped tokens of no grid (LLaVA-NeXT's newlines) average into nothing
            members = members.to(tokens.device)
            owner, tokens = owner[members], tokens[:, members]
        sums = tokens.new_zeros(b, k, d).index_add_(1, owner, tokens)
        return kept, sums / plan.sizes.to(tokens.device, tokens.dtype)[None, :, None]


@hookimpl
def resprune_register_selectors(register):
    register(PoolSelector)


@hookimpl
def resprune_register_mergers(register):
    register(PoolMerger)
