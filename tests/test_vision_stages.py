"""Stages inside the vision tower (``vision_layer=K``) on the tiny LLaVA-1.5 and LLaVA-NeXT.

Keep-all is bit-identical to the unpruned model; a stage's kept tokens and the features the
LLM receives equal a layer-by-layer reference on an eager twin of the tower (CLS attention
from the eager attention matrix, the pruned sequence run through the remaining blocks by
hand); a pipeline may prune in the tower, before the LLM and inside it in one call.
"""

from __future__ import annotations

import functools

import pytest
import torch

import resprune
from resprune.costs import vision_dims, vision_flops
from resprune.errors import ConfigError, IncompatibleBackboneError
from resprune.selection import make_selector
from resprune.stages import Stage
from resprune.testing.tiny import tiny_inputs, tiny_lvlm
from test_backbones import photos

PROMPTS = ["What is shown in the picture?", "Describe the colours of the sky, please.", "Is it a dog?"]
DEPTH = 4  # encoder layers of the tiny towers here: features from hidden_states[3]


@functools.cache
def model(model_type: str, attn: str = "sdpa", text_layers: int = 2):
    return tiny_lvlm(model_type, attn_implementation=attn, vision_layers=DEPTH, text_layers=text_layers)


def inputs(model_type: str, batch: int):
    _, proc = model(model_type)
    return tiny_inputs(model_type, proc, photos()[:batch], PROMPTS[:batch])


def cls_topk(budget, layer: int) -> Stage:
    return Stage(make_selector("topk", {"score": "cls_attention"}), budget=budget, vision_layer=layer,
                 scorers=["cls_attention"])


def keep_all(layer: int) -> Stage:
    return cls_topk(1.0, layer) if layer else Stage("uniform", budget=1.0, vision_layer=0)


@pytest.mark.parametrize("model_type", ["llava", "llava_next"])
@pytest.mark.parametrize("layer", [0, 2, DEPTH - 1])
def test_keep_all_inside_the_tower_is_bit_identical(model_type, layer):
    lvlm, proc = model(model_type)
    batch = inputs(model_type, 2)
    pipe = resprune.Pipeline(None, budget=1.0, stages=[keep_all(layer)])
    with torch.no_grad():
        ref = lvlm(**batch).logits
        ref_ids = lvlm.generate(**batch, max_new_tokens=4, do_sample=False)
        with pipe.attach(lvlm, proc) as attached:
            out = lvlm(**batch).logits
            ids = lvlm.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.equal(ids, ref_ids)
    tower = attached.last.tower_schedule
    assert tower[0][1] == tower[-1][1] and tower[-1][0] == layer


def test_qwen_refuses_stages_inside_its_tower_and_says_which_layers_are_allowed():
    lvlm, proc = tiny_lvlm("qwen2_5_vl")
    pipe = resprune.Pipeline(None, budget=1.0, stages=[Stage("uniform", budget=0.5, vision_layer=1)])
    with pytest.raises(IncompatibleBackboneError, match=r"vision layer 1 stage.*window.*allowed vision layers: none"):
        pipe.attach(lvlm, proc)


# --- against a layer-by-layer reference on an eager twin ------------------------------------------


def eager_reference(model_type: str, pixel_values: torch.Tensor, layer: int, k: int):
    """Kept patch indices ``[tiles, k]`` (top-k CLS attention of block ``layer - 1``, the
    eager matrix averaged over heads; ties to the lower index) and the projected features of the
    feature layer ``[tiles, k, D]``, the pruned sequence run through the blocks by hand."""
    twin, _ = model(model_type, "eager")
    tower = twin.model.vision_tower
    with torch.no_grad():
        if pixel_values.dim() == 5:  # LLaVA-NeXT: every tile of every image
            pixel_values = pixel_values.flatten(0, 1)
        h = tower.pre_layrnorm(tower.embeddings(pixel_values))
        kept = None
        for index, block in enumerate(tower.encoder.layers):
            if index == layer:
                patches = h[:, 1:]
                score = cls_row[:, 1:]
                order = torch.sort(-score, dim=1, stable=True).indices[:, :k]
                kept = order.sort(dim=1).values
                h = torch.cat([h[:, :1], patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, h.shape[-1]))], dim=1)
            if index == DEPTH - 1:  # hidden_states[3]: the features
                break
            _, weights = block.self_attn(block.layer_norm1(h))
            cls_row = weights.mean(dim=1)[:, 0]  # [tiles, S]
            h = block(h, None)
        feats = twin.model.multi_modal_projector(h[:, 1:])
    return kept, feats


@pytest.mark.parametrize("batch, layer", [(1, 2), (3, 2), (3, 1), (2, DEPTH - 1)])
def test_llava_inside_the_tower_keeps_the_reference_set_and_feeds_its_features(batch, layer):
    lvlm, proc = model("llava")
    data = inputs("llava", batch)
    k = 11
    pipe = resprune.Pipeline(None, budget=1.0, stages=[cls_topk(k, layer)])
    with torch.no_grad(), pipe.attach(lvlm, proc) as attached:
        pruned = attached.prune(data)
    kept, feats = eager_reference("llava", data["pixel_values"], layer, k)
    (where, sels), = attached.kept_by_stage()
    assert where == f"vision layer {layer}"
    for i, sel in enumerate(sels):
        assert sel.kept.tolist() == kept[i].tolist()
        assert sel.n == 36 and sel.k == k
    slots = pruned.input_ids == lvlm.config.image_token_id
    got = pruned.inputs_embeds[slots].view(batch, k, -1)
    torch.testing.assert_close(got, feats, rtol=1e-5, atol=1e-5)
    tiles, length = batch, 37
    assert pruned.tower_schedule == [(0, tiles * length), (layer, tiles * (k + 1))]


def test_llava_next_prunes_every_tile_and_the_llm_sees_only_what_is_left():
    lvlm, proc = model("llava_next")
    data = inputs("llava_next", 2)
    layer, k = 1, 5
    pipe = resprune.Pipeline(None, budget=1.0, stages=[cls_topk(k, layer)])
    with torch.no_grad(), pipe.attach(lvlm, proc) as attached:
        pruned = attached.prune(data)
    kept, feats = eager_reference("llava_next", data["pixel_values"], layer, k)
    tiles = kept.shape[0]
    assert pruned.tower_tiles == tiles
    assert pruned.tower_schedule == [(0, tiles * 10), (layer, tiles * (k + 1))]
    # every kept tile feature reaches the LLM exactly once, and nothing else from the tiles
    slots = (pruned.input_ids == lvlm.config.image_token_id) & pruned.attention_mask.bool()
    got = pruned.inputs_embeds[slots]
    newline = lvlm.model.image_newline.to(got.dtype)
    is_newline = torch.isclose(got, newline, atol=1e-6).all(dim=-1)
    tile_feats = got[~is_newline]
    want = feats.flatten(0, 1)
    assert tile_feats.shape[0] <= want.shape[0]  # unpadding may drop whole rows of a crop
    distance = torch.cdist(tile_feats, want)
    assert float(distance.min(dim=1).values.max()) < 1e-4


def test_a_pipeline_prunes_in_the_tower_before_the_llm_and_inside_it():
    lvlm, proc = model("llava", text_layers=3)
    data = inputs("llava", 2)
    pipe = resprune.Pipeline("uniform", budget=12, stages=[
        cls_topk(24, 1), Stage(make_selector("topk", {"score": "llm_attention"}), budget=6, layer=2,
                               scorers=["llm_attention"])])
    with torch.no_grad(), pipe.attach(lvlm, proc) as attached:
        out = lvlm.generate(**data, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == data["input_ids"].shape[1] + 3
    stages = attached.kept_by_stage()
    assert [where for where, _ in stages] == ["vision layer 1", "input", "layer 2"]
    for i in range(2):
        tower, first, inside = (set(sels[i].kept.tolist()) for _, sels in stages)
        assert inside <= first <= tower
        assert (len(tower), len(first), len(inside)) == (24, 12, 6)
    assert attached.last.tower_schedule == [(0, 2 * 37), (1, 2 * 25)]


def test_a_merger_inside_the_tower_feeds_merged_tokens():
    lvlm, proc = model("llava")
    data = inputs("llava", 1)
    stage = Stage(make_selector("topk", {"score": "cls_attention"}), budget=10, vision_layer=3,
                  scorers=["cls_attention"], merger="contextual")
    plain = Stage(make_selector("topk", {"score": "cls_attention"}), budget=10, vision_layer=3,
                  scorers=["cls_attention"])
    with torch.no_grad():
        with resprune.Pipeline(None, budget=1.0, stages=[stage]).attach(lvlm, proc) as merged:
            a = merged.prune(data)
        with resprune.Pipeline(None, budget=1.0, stages=[plain]).attach(lvlm, proc) as topk:
            b = topk.prune(data)
    assert a.selections[0].k == b.selections[0].k == 10
    slots = a.input_ids == lvlm.config.image_token_id
    assert not torch.equal(a.inputs_embeds[slots], b.inputs_embeds[slots])


# --- bad input ---------------------------------------------------------------------------------


def test_a_stage_past_the_feature_layer_is_named():
    lvlm, proc = model("llava")
    pipe = resprune.Pipeline(None, budget=1.0, stages=[cls_topk(8, DEPTH)])
    with pytest.raises(ConfigError, match=rf"vision layer {DEPTH} stage.*hidden_states\[3\].*vision_layer 0\.\.3"):
        with pipe.attach(lvlm, proc) as attached:
            attached.prune(inputs("llava", 1))


def test_cls_attention_at_the_embeddings_is_refused():
    lvlm, proc = model("llava")
    pipe = resprune.Pipeline(None, budget=1.0, stages=[cls_topk(8, 0)])
    with pytest.raises(ConfigError, match="vision_layer 0"):
        with pipe.attach(lvlm, proc) as attached:
            attached.prune(inputs("llava", 1))


def test_a_field_the_tower_has_not_is_named_at_attach():
    lvlm, proc = model("llava")
    pipe = resprune.Pipeline(None, budget=1.0, stages=[Stage("topk", budget=8, vision_layer=1,
                                                             scorers=["text_relevance"])])
    with pytest.raises(resprune.errors.MissingContextError, match="vision layer 1 stage.*needs context .text.*input stage"):
        pipe.attach(lvlm, proc)


@pytest.mark.parametrize("kwargs, message", [
    ({"vision_layer": -1}, "vision_layer=-1"),
    ({"vision_layer": True}, "vision_layer=True"),
    ({"vision_layer": 1, "layer": 2}, "not both"),
])
def test_stage_arguments_are_checked(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Stage("uniform", budget=4, **kwargs)


def test_vision_stages_must_increase():
    with pytest.raises(ConfigError, match="vision_layers must increase"):
        resprune.Pipeline(None, budget=1.0, stages=[keep_all(2), keep_all(1)])


def test_config_vision_stages_load_and_are_checked():
    cfg = {"budget": 64, "selector": {"name": "uniform"},
           "vision_stages": [{"layer": 12, "budget": 288, "selector": {"name": "topk", "params": {"score": "cls_attention"}},
                              "scorers": [{"name": "cls_attention"}]}]}
    pipe = resprune.load_pipeline(cfg)
    assert [s.where for s in pipe.stages] == ["vision layer 12", "input"]
    assert pipe.vision_stages[0].budget == 288
    assert "vision_stages" in pipe.describe()
    bad = {**cfg, "vision_stages": [{**cfg["vision_stages"][0], "layer": -2}]}
    with pytest.raises(ConfigError, match=r"vision_stages\[0\]\.layer=-2"):
        resprune.load_pipeline(bad)
    with pytest.raises(ConfigError, match=r"vision_stages\[0\]"):
        resprune.load_pipeline({**cfg, "vision_stages": [{"layer": 3, "selector": {"name": "nope"}}]})


def test_vision_flops_follow_the_tower_schedule():
    lvlm, _ = model("llava")
    dims = vision_dims(lvlm.config)
    full = vision_flops(dims, 2 * 37, tiles=2)
    d, m = 32.0, 64.0
    per_layer = 2 * (8 * 37 * d * d + 4 * 37 * 37 * d + 4 * 37 * d * m)
    assert full == pytest.approx(DEPTH * per_layer)
    pruned = vision_flops(dims, [(0, 74), (2, 2 * 12)], tiles=2)
    assert pruned == pytest.approx(2 * per_layer + 2 * 2 * (8 * 12 * d * d + 4 * 144 * d + 4 * 12 * d * m))
    assert pruned < full


# --- ToMe against a transcription of the official code -------------------------------------------
# facebookresearch/ToMe @ af95e4b: tome/merge.py (bipartite_soft_matching, merge_wavg) and
# tome/patch/timm.py (ToMeBlock.forward, ToMeAttention.forward), written out on the eager twin's
# CLIP blocks; r per block is the even split of 36 - k over the blocks before the features.


def official_bipartite_soft_matching(metric, r, class_token):
    protected = 1 if class_token else 0
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -float("inf")
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def official_merge_wavg(merge, x, size=None):
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def official_tome_tower(pixel_values, budget, first=0, prop_attn=True):
    """The projected features of hidden_states[3], ToMe-merged in blocks first..2, in ToMe's order."""
    twin, _ = model("llava", "eager")
    tower = twin.model.vision_tower
    blocks = DEPTH - 1 - first
    total = 36 - budget
    rs = [total // blocks + (1 if i < total % blocks else 0) for i in range(blocks)]
    with torch.no_grad():
        x = tower.pre_layrnorm(tower.embeddings(pixel_values))
        size = None
        for index, block in enumerate(tower.encoder.layers[:DEPTH - 1]):
            if index < first:
                x = block(x, None)
                continue
            attn = block.self_attn
            h = block.layer_norm1(x)
            b, n, c = h.shape
            q = attn.q_proj(h).reshape(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).reshape(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(h).reshape(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
            logits = (q @ k.transpose(-2, -1)) * attn.scale
            if prop_attn and size is not None:
                logits = logits + size.log()[:, None, None, :, 0]
            out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
            x = x + attn.out_proj(out)
            metric = k.mean(1)
            r = rs.pop(0)
            if r > 0:
                merge = official_bipartite_soft_matching(metric, r, True)
                x, size = official_merge_wavg(merge, x, size)
            x = x + block.mlp(block.layer_norm2(x))
        return twin.model.multi_modal_projector(x[:, 1:])


@pytest.mark.parametrize("batch, budget, first, prop", [(1, 14, 0, True), (3, 20, 0, True), (3, 22, 1, True),
                                                         (2, 14, 0, False)])
def test_tome_in_the_tower_feeds_the_llm_what_the_official_code_outputs(batch, budget, first, prop):
    lvlm, proc = model("llava")
    data = inputs("llava", batch)
    tome = make_selector("tome", {"proportional_attention": prop})
    pipe = resprune.Pipeline(None, budget=1.0, stages=[Stage(tome, budget=budget, vision_layer=first)])
    with torch.no_grad(), pipe.attach(lvlm, proc) as attached:
        pruned = attached.prune(data)
    want = official_tome_tower(data["pixel_values"], budget, first, prop)  # [B, budget, D] in ToMe's order
    slots = pruned.input_ids == lvlm.config.image_token_id
    got = pruned.inputs_embeds[slots].view(batch, budget, -1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert [sel.k for sel in pruned.selections] == [budget] * batch


def test_tome_in_place_order_feeds_the_same_tokens_sorted_by_their_places():
    lvlm, proc = model("llava")
    data = inputs("llava", 2)
    outputs = {}
    for sequence in ("tome", "places"):
        tome = make_selector("tome", {"sequence": sequence})
        pipe = resprune.Pipeline(None, budget=1.0, stages=[Stage(tome, budget=16, vision_layer=0)])
        with torch.no_grad(), pipe.attach(lvlm, proc) as attached:
            pruned = attached.prune(data)
        slots = pruned.input_ids == lvlm.config.image_token_id
        outputs[sequence] = (pruned.inputs_embeds[slots].view(2, 16, -1), [s.kept for s in pruned.selections])
    (a, kept_a), (b, kept_b) = outputs["tome"], outputs["places"]
    assert all(torch.equal(x, y) for x, y in zip(kept_a, kept_b))  # the same places survive
    assert not torch.equal(a, b)  # in another order ...
    for i in range(2):  # ... the same tokens
        distance = torch.cdist(a[i], b[i])
        assert float(distance.min(dim=1).values.max()) < 1e-4


def test_tome_that_cannot_meet_its_budget_says_why():
    lvlm, proc = model("llava")
    pipe = resprune.Pipeline(None, budget=1.0, stages=[Stage("tome", budget=2, vision_layer=2)])
    with pytest.raises(resprune.errors.BudgetError, match="at most half"):
        with torch.no_grad(), pipe.attach(lvlm, proc) as attached:
            attached.prune(inputs("llava", 1))


def test_tome_must_be_the_last_stage_in_the_tower_and_merge_in_some_block():
    lvlm, proc = model("llava")
    for stages, message in (([Stage("tome", budget=20, vision_layer=0), keep_all(2)], "last stage"),
                            ([Stage("tome", budget=20, vision_layer=DEPTH - 1)], "which is none")):
        with pytest.raises(ConfigError, match=message):
            with torch.no_grad(), resprune.Pipeline(None, budget=1.0, stages=stages).attach(lvlm, proc) as attached:
                attached.prune(inputs("llava", 1))


def test_tome_as_a_plain_selector_keeps_the_carriers_of_its_matching_rounds():
    torch.manual_seed(0)
    tokens = torch.randn(3, 30, 8)
    kept = resprune.select(tokens, 9, selector="tome", order="selection")
    for row in range(3):  # the same rounds with the official functions, carriers tracked through merge()
        x, size = tokens[row: row + 1], None
        carriers = torch.arange(30.0).view(1, 30, 1)
        while x.shape[1] > 9:
            n = x.shape[1]
            r = min(n - 9, n // 2)
            merge = official_bipartite_soft_matching(x, r, False)
            even = (torch.arange(n) % 2 == 0).view(1, n, 1)
            of_a = merge(torch.where(even, carriers, -1.0), mode="amax")  # unmerged A tokens: their own
            of_b = merge(torch.where(even, -1.0, carriers), mode="amax")  # B tokens: their own (sources are -1)
            unmerged = (n + 1) // 2 - r
            carriers = torch.cat([of_a[:, :unmerged], of_b[:, unmerged:]], dim=1)
            x, size = official_merge_wavg(merge, x, size)
        assert kept[row].tolist() == carriers.view(-1).long().tolist()


def test_the_tower_is_restored_after_tome():
    lvlm, proc = model("llava")
    data = inputs("llava", 2)
    blocks = lvlm.model.vision_tower.encoder.layers
    sentinel = blocks[1].forward
    blocks[1].forward = sentinel  # a forward set on the instance (as accelerate does) survives
    try:
        with torch.no_grad():
            reference = lvlm(**data).logits
            with resprune.Pipeline(None, budget=1.0, stages=[Stage("tome", budget=20, vision_layer=0)]).attach(
                    lvlm, proc) as attached:
                assert not torch.equal(lvlm(**data).logits[:, -1], reference[:, -1])
                assert blocks[1].forward is sentinel  # the blocks merge only while the tower runs
            assert attached.last.tower_schedule[-1] == (3, 2 * 21)
            assert torch.equal(lvlm(**data).logits, reference)
        assert "forward" not in blocks[0].__dict__ and blocks[1].__dict__["forward"] is sentinel
    finally:
        blocks[1].__dict__.pop("forward", None)
