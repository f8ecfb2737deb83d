"""The `pool` baseline: average pooling of each image's grid to exactly the budget."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import resprune
from resprune.context import PruneContext
from resprune.errors import ConfigError, InvalidInputError, PluginContractError
from resprune.plugins import get_host
from resprune.strategies.pool import band_cells, band_centres, pool_plan

BACKBONES = ("llava", "llava_next", "qwen2_5_vl")


def pool(mode: str = "mean"):
    host = get_host()
    return host.selectors.get("pool")(), host.mergers.get("pool")({"mode": mode})


def pooled(tokens: torch.Tensor, context: PruneContext, k: int, mode: str = "mean"):
    selector, merger = pool(mode)
    kept = selector.select(tokens, k, {}, context).sort(dim=1).values
    return merger.merge(tokens, kept, 0, {}, context)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.data())
def test_band_cells_tile_the_grid_with_exactly_k_cells(rows, cols, data):
    k = data.draw(st.integers(1, rows * cols))
    cells = band_cells(rows, cols, k)
    assert len(cells) == k
    cover = torch.zeros(rows, cols, dtype=torch.long)
    for r0, r1, c0, c1 in cells:
        assert r0 < r1 and c0 < c1
        cover[r0:r1, c0:c1] += 1
    assert bool((cover == 1).all())  # disjoint, and every token in one cell


@pytest.mark.parametrize("k, stride", [(64, 3), (144, 2), (36, 4), (576, 1)])
@pytest.mark.parametrize("mode", ["mean", "bilinear"])
def test_on_llava_15s_grid_it_is_s_by_s_pooling(k, stride, mode):
    """24x24 at 64 tokens is 3x3 pooling (avg_pool2d), at 144 2x2; bilinear is F.interpolate's."""
    tokens = torch.randn(2, 576, 5)
    context = PruneContext(tokens, grid=(24, 24))
    places, features = pooled(tokens, context, k, mode)
    image = tokens.view(2, 24, 24, 5).permute(0, 3, 1, 2)
    side = 24 // stride
    if mode == "mean":
        want = F.avg_pool2d(image, stride)
    else:
        want = F.interpolate(image, size=(side, side), mode="bilinear", align_corners=False)
    torch.testing.assert_close(features, want.permute(0, 2, 3, 1).reshape(2, k, 5))
    centre = torch.arange(side) * stride + (stride - 1) // 2
    assert places[0].tolist() == (centre[:, None] * 24 + centre[None, :]).reshape(-1).tolist()


def test_bilinear_is_llava_onevisions_pooling_where_the_grid_does_not_divide():
    """A literal transcription of ``LlavaOnevisionModel.apply_pooling`` (transformers 5.17): a
    27x27 grid resampled to ceil(27 / 2) = 14 a side, ``F.interpolate(mode="bilinear")``."""
    tokens = torch.randn(2, 729, 6)
    _, features = pooled(tokens, PruneContext(tokens, grid=(27, 27)), 196, "bilinear")
    image = tokens.view(2, 27, 27, 6).permute(0, 3, 1, 2).contiguous()
    want = F.interpolate(image, size=[math.ceil(27 / 2), math.ceil(27 / 2)], mode="bilinear")
    torch.testing.assert_close(features, want.permute(0, 2, 3, 1).reshape(2, 196, 6))
    wide = torch.randn(1, 24 * 40, 3)  # a 24x40 grid to 10x16 (what the band lattice gives for 160)
    _, features = pooled(wide, PruneContext(wide, grid=(24, 40)), 160, "bilinear")
    want = F.interpolate(wide.view(1, 24, 40, 3).permute(0, 3, 1, 2), size=(10, 16), mode="bilinear")
    torch.testing.assert_close(features, want.permute(0, 2, 3, 1).reshape(1, 160, 3))


def test_constant_patches_give_their_constants():
    values = torch.randn(8, 8)
    image = values.repeat_interleave(3, 0).repeat_interleave(3, 1)  # 3x3 patches of one value each
    tokens = image.reshape(1, 576, 1).expand(1, 576, 4).contiguous()
    for mode in ("mean", "bilinear"):
        _, features = pooled(tokens, PruneContext(tokens, grid=(24, 24)), 64, mode)
        torch.testing.assert_close(features[0, :, 0], values.reshape(-1))


def test_a_budget_that_does_not_divide_the_grid_still_keeps_exactly_k_and_means_each_cell():
    tokens = torch.randn(1, 576, 3)
    context = PruneContext(tokens, grid=(24, 24))
    places, features = pooled(tokens, context, 128)
    assert places.shape == (1, 128)
    plan = pool_plan(context, 576, 128)
    for j in range(128):
        members = (plan.owner == j).nonzero().squeeze(1)
        torch.testing.assert_close(features[0, j], tokens[0, members].mean(0))
        assert int(places[0, j]) in members.tolist()


# --- the three backbones: geometry from the tiny models --------------------------------------------


@functools.cache
def encoded(model_type: str):
    from test_backbones import inputs_for, model_and_processor

    model, proc = model_and_processor(model_type)
    inputs = inputs_for(model_type, batch=1)
    with resprune.load_pipeline("pool", budget=0.25).attach(model, proc) as attached, torch.no_grad():
        (image,) = attached.injector.encode(model, inputs, frozenset())
    return image


def context_of(image, tokens: torch.Tensor) -> PruneContext:
    return PruneContext(tokens, grid=image.grid, positions=image.positions, tiles=image.tiles, frames=image.frames)


@pytest.mark.parametrize("model_type", BACKBONES)
@pytest.mark.parametrize("mode", ["mean", "bilinear"])
def test_a_gradient_pools_to_each_cells_centre_on_every_backbone(model_type, mode):
    """Tokens that are their own (row, col): a linear gradient, whose mean over a cell is the cell's
    centre and whose bilinear sample is the point sampled (``band_centres``, per grid); the pooled
    token's place is inside its cell."""
    image = encoded(model_type)
    ctx = context_of(image, image.features[None].float())
    positions = ctx.get("positions")
    spatial = ~torch.isnan(positions).any(1)
    n = image.n
    k = max(4, int(spatial.sum()) // 7)
    plan = pool_plan(ctx, n, k)
    # each token's (row, col) in its own grid's units: what a linear gradient over the grid holds
    grid_rc = torch.full((n, 2), float("nan"))
    region = torch.zeros(n, dtype=torch.long) if image.tiles is None else (image.tiles > 0).long()
    for rid in torch.unique(region[spatial]).tolist():
        members = (spatial & (region == rid)).nonzero().squeeze(1)
        for axis in (0, 1):
            values = torch.unique(positions[members, axis])
            grid_rc[members, axis] = torch.searchsorted(values, positions[members, axis]).float()
    tokens = torch.nan_to_num(grid_rc, nan=-1.0)[None]
    places, features = pooled(tokens, context_of(image, tokens), k, mode)
    assert places.shape == (1, k) and torch.equal(places[0], plan.places)
    sampled = []  # where bilinear samples each cell: each grid's cells in raster order, as the places
    for rid in torch.unique(region[spatial]).tolist():
        members = (spatial & (region == rid)).nonzero().squeeze(1)
        share = sum(int(region[p]) == rid for p in places[0].tolist())
        rows, cols = (int(grid_rc[members, axis].max()) + 1 for axis in (0, 1))
        sampled += band_centres(rows, cols, share)
    for j in range(k):
        members = (plan.owner == j).nonzero().squeeze(1)
        rc = grid_rc[members]
        centre = (rc.min(0).values + rc.max(0).values) / 2
        want = centre if mode == "mean" else torch.tensor(sampled[j], dtype=torch.float32)
        torch.testing.assert_close(features[0, j], want)
        assert int(places[0, j]) in members.tolist()
        assert bool(((grid_rc[places[0, j]] - centre).abs() <= 0.5).all())  # its position: the cell's centre token
    if image.tiles is not None:  # LLaVA-NeXT: the base image and the crops pooled apart
        assert {int(image.tiles[p]) > 0 for p in places[0].tolist()} == {False, True}


@pytest.mark.parametrize("model_type", BACKBONES)
def test_pooled_features_reach_the_llm_and_keep_all_is_the_unpruned_model(model_type):
    from test_backbones import inputs_for, model_and_processor

    model, proc = model_and_processor(model_type)
    inputs = inputs_for(model_type)
    with torch.no_grad():
        want = model(**inputs).logits
        with resprune.load_pipeline("pool", budget=1.0).attach(model, proc), torch.no_grad():
            same = model(**inputs).logits
        with resprune.load_pipeline("pool", budget=0.25).attach(model, proc) as attached:
            model(**inputs)
    torch.testing.assert_close(same, want, rtol=0, atol=0)
    for sel in attached.selections:
        assert sel.features is not None and sel.k < sel.n
        image = encoded(model_type) if sel.image == 0 else None
        if image is not None:
            ctx = context_of(image, image.features[None].float())
            plan = pool_plan(ctx, image.n, sel.k)
            assert sel.kept.tolist() == plan.places.tolist()
            members = (plan.owner == 0).nonzero().squeeze(1)
            torch.testing.assert_close(sel.features[0], image.features[members].float().mean(0))


def test_pool_merger_refuses_another_selector_and_pool_brings_its_merger():
    from resprune.stages import Stage

    with pytest.raises(ConfigError, match="use selector: pool"):
        Stage("topk", budget=64, scorers=["norm"], merger="pool")
    assert Stage("pool", budget=64).merger.name == "pool"  # selector pool runs its merger by itself
    assert resprune.load_pipeline("resprune-llava15", selector="pool").input_stage.merger.name == "pool"
    tokens = torch.randn(1, 576, 3)
    _, merger = pool()
    with pytest.raises(PluginContractError, match="not the centres"):
        merger.merge(tokens, torch.arange(64)[None], 0, {}, PruneContext(tokens, grid=(24, 24)))


def test_tokens_with_holes_are_refused_with_the_reason():
    tokens = torch.randn(1, 10, 3)
    positions = torch.tensor([[r, c] for r in range(4) for c in range(3)], dtype=torch.float32)[:10]
    with pytest.raises(InvalidInputError, match="not a full grid"):
        pool_plan(PruneContext(tokens, positions=positions), 10, 4)


def test_inside_the_llm_images_with_other_positions_are_refused_not_given_the_first_ones():
    """A stage inside the LLM holds one `positions` for the images it prunes together: two images
    of the same token count but transposed grids must not share the first one's."""
    from resprune.pipeline import Pipeline
    from resprune.stages import Stage
    from resprune.testing.tiny import tiny_inputs, tiny_lvlm
    from test_backbones import photos

    model, proc = tiny_lvlm("qwen2_5_vl", seed=0)
    wide, tall = photos()[0].resize((112, 84)), photos()[1].resize((84, 112))
    pipe = Pipeline(None, budget=1.0, stages=[Stage("pool", budget=0.5, layer=1)])
    prompts = ["What is shown?", "Describe it."]
    with torch.no_grad(), pipe.attach(model, proc) as attached:
        model(**tiny_inputs("qwen2_5_vl", proc, [wide, wide.transpose(0)], prompts))  # one geometry: together
        (record,) = attached.last.stages
        assert [s.k for s in record.selections] == [s.n // 2 for s in record.selections]
        with pytest.raises(InvalidInputError, match="different token positions"):
            model(**tiny_inputs("qwen2_5_vl", proc, [wide, tall], prompts))
