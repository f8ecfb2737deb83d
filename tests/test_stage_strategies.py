"""DART, the mergers, stages and multi-stage costs against slow, obviously correct references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import resprune
from resprune.context import PruneContext
from resprune.costs import LLMDims, kv_cache_bytes, layer_tokens, prefill_flops
from resprune.errors import ConfigError, PluginContractError
from resprune.interfaces import Merger
from resprune.selection import run_merger
from resprune.stages import Stage

settings.register_profile("stages", deadline=None, max_examples=30)
settings.load_profile("stages")


def host():
    return resprune.get_host()


# --- DART ---------------------------------------------------------------------------------------


def dart_reference(tokens, score, k, image_pivots, text=None, text_norm=None, text_pivots=0):
    """One image, plain Python loops: pivots by score, then per pivot the least similar not-yet-kept."""
    n = tokens.shape[0]
    unit = [tokens[i] / tokens[i].norm().clamp_min(1e-12) for i in range(n)]
    ranked = sorted(range(n), key=lambda i: (-float(score[i]), i))
    pivots = ranked[: min(image_pivots, k)]
    if len(pivots) == k:
        return pivots
    vectors = [unit[i] for i in pivots]
    if text is not None and text_pivots:
        t_rank = sorted(range(text.shape[0]), key=lambda j: (-float(text_norm[j]), j))[:text_pivots]
        vectors += [text[j] / text[j].norm().clamp_min(1e-12) for j in t_rank]
    taken = list(pivots)
    need = k - len(pivots)
    for j, v in enumerate(vectors):
        quota = need // len(vectors) + (1 if j < need % len(vectors) else 0)
        free = [i for i in range(n) if i not in taken]
        free.sort(key=lambda i: (float(unit[i] @ v), i))
        taken += free[:quota]
    return taken


@given(st.integers(2, 40), st.integers(1, 40), st.integers(0, 6), st.integers(0, 3), st.integers(0, 999))
def test_dart_matches_the_loop_reference(n, k, image_pivots, text_pivots, seed):
    k = min(k, n)
    image_pivots = max(image_pivots, 0 if text_pivots else 1)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(1, n, 8, generator=gen)
    score = torch.randn(1, n, generator=gen)
    text = torch.randn(1, 5, 8, generator=gen)
    norm = torch.randn(1, 5, generator=gen)
    ctx = PruneContext(tokens, llm_text_hidden=text, llm_text_key_norm=norm)
    dart = host().selectors.get("dart")({"image_pivots": image_pivots, "text_pivots": text_pivots, "score": "s"})
    got = dart.select(tokens, k, {"s": score}, ctx)
    assert got.shape == (1, k) and len(set(got[0].tolist())) == k
    want = dart_reference(tokens[0], score[0], k, image_pivots, text[0], norm[0], text_pivots)
    assert got[0].tolist() == want


def test_dart_needs_a_pivot():
    with pytest.raises(ConfigError, match="image_pivots \\+ text_pivots"):
        resprune.load_pipeline({"budget": 4, "selector": {"name": "dart", "params": {"image_pivots": 0,
                                                                                        "text_pivots": 0}},
                                "scorers": [{"name": "norm", "output": "key_norm"}]})


# --- mergers ------------------------------------------------------------------------------------


def merge_reference(tokens, kept, slots, into_kept):
    """One image: the dropped tokens, their targets, assignment by first maximal cosine, means."""
    n = tokens.shape[0]
    kept = sorted(kept)
    dropped = [i for i in range(n) if i not in kept]
    unit = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if into_kept:
        targets, members = kept, dropped
    elif slots == 0:
        return kept, tokens[kept]
    else:
        step = max(1, len(dropped) // slots)
        picks = list(range(0, len(dropped), step))[:slots]
        targets = [dropped[p] for p in picks]
        members = [d for d in dropped if d not in targets]
    groups = {t: [t] for t in targets}
    for m in members:
        sims = [float(unit[m] @ unit[t]) for t in targets]
        groups[targets[sims.index(max(sims))]].append(m)
    places = sorted(kept + ([] if into_kept else targets))
    feats = []
    for p in places:
        members_of = groups.get(p, [p])
        feats.append(tokens[members_of].mean(0))
    return places, torch.stack(feats)


@given(st.integers(3, 40), st.integers(1, 39), st.floats(0.0, 0.6), st.integers(0, 999))
def test_contextual_merger_matches_the_loop_reference(n, k, share, seed):
    k = min(k, n - 1)
    tokens = torch.randn(2, n, 6, generator=torch.Generator().manual_seed(seed))
    merger = host().mergers.get("contextual")({"share": share})
    slots = merger.slots(k, n)
    assert 0 <= slots < k
    kept = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(seed + r))[: k - slots].sort().values
                        for r in range(2)])
    indices, features = run_merger(merger, tokens, kept, slots, {}, PruneContext(tokens))
    for r in range(2):
        places, feats = merge_reference(tokens[r], kept[r].tolist(), slots, into_kept=False)
        assert indices[r].tolist() == places
        torch.testing.assert_close(features[r], feats, atol=1e-6, rtol=1e-5)


@given(st.integers(2, 40), st.integers(1, 39), st.integers(0, 999))
def test_nearest_merger_matches_the_loop_reference(n, k, seed):
    k = min(k, n)
    tokens = torch.randn(1, n, 6, generator=torch.Generator().manual_seed(seed))
    kept = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values[None]
    indices, features = run_merger(host().mergers.get("nearest")(), tokens, kept, 0, {}, PruneContext(tokens))
    places, feats = merge_reference(tokens[0], kept[0].tolist(), 0, into_kept=True)
    assert indices[0].tolist() == places
    torch.testing.assert_close(features[0], feats, atol=1e-6, rtol=1e-5)


def test_a_stage_with_a_merger_keeps_the_budget_and_records_the_merged_places():
    tokens = torch.randn(2, 50, 16)
    stage = Stage(host().selectors.get("topk")({"score": "norm"}), budget=12, scorers=["norm"], merger="contextual")
    sel = stage.run(PruneContext(tokens))
    slots = stage.merger.slots(12, 50)
    assert sel.k == 12 and sel.kept.shape == (2, 12) and sel.features.shape == (2, 12, 16)
    picks = tokens.norm(dim=-1).topk(12 - slots).indices
    for r in range(2):
        assert set(picks[r].tolist()) <= set(sel.kept[r].tolist())
        assert sorted(sel.order[r].tolist()) == sel.kept[r].tolist()
        kept_feats = {int(i): f for i, f in zip(sel.kept[r], sel.features[r])}
        for i in picks[r].tolist():  # the selector's picks keep their own features
            torch.testing.assert_close(kept_feats[i], tokens[r, i])


class _Bad(Merger):
    name = "bad_merger"

    def slots(self, k, n):
        return 1

    def merge(self, tokens, kept, slots, scores, context):
        b, n, d = tokens.shape
        idx = torch.cat([kept[:, :1], kept], 1)  # a duplicate place
        return idx, torch.zeros(b, idx.shape[1], d)


def test_merger_contract_violations_are_named():
    tokens = torch.randn(1, 10, 4)
    with pytest.raises(PluginContractError, match="bad_merger.*distinct"):
        Stage("random", budget=4, merger=_Bad()).run(PruneContext(tokens))


# --- stages and configs ---------------------------------------------------------------------------


def test_stage_and_pipeline_shapes_are_checked():
    with pytest.raises(ConfigError, match="layer K >= 1"):
        Stage("topk", budget=4, layer=0)
    with pytest.raises(ConfigError, match="layers must increase"):
        resprune.Pipeline(None, budget=4, stages=[Stage("random", budget=4, layer=3),
                                                  Stage("random", budget=4, layer=2)])
    with pytest.raises(ConfigError, match="needs a selector"):
        resprune.Pipeline(None, budget=4)
    with pytest.raises(ConfigError, match="every entry of stages needs layer"):
        resprune.Pipeline("random", budget=4, stages=[Stage("random", budget=4)])
    with pytest.raises(ConfigError, match="no input stage"):
        resprune.load_pipeline("fastv").prune(torch.randn(10, 4))


def test_stage_configs_are_validated_with_their_key():
    base = {"budget": 8, "stages": [{"layer": 2, "selector": {"name": "random"}}]}
    assert resprune.load_pipeline(base).llm_stages[0].budget == 8  # budget: null takes the top level
    bad = [
        ({"stages": [{"layer": 2, "selector": {"name": "random"}}, {"layer": 2, "selector": {"name": "random"}}]},
         r"stages\[1\]\.layer=2: stage layers must increase"),
        ({"stages": [{"layer": 0, "selector": {"name": "random"}}]}, r"stages\[0\]\.layer=0"),
        ({"stages": [{"layer": 2}]}, r"stages\[0\]\.selector\.name: missing"),
        ({"stages": [{"layer": 2, "budget": 1.5, "selector": {"name": "random"}}]}, r"stages\[0\]\.budget"),
        ({"stages": [{"layer": 2, "selector": {"name": "randm"}}]}, r"stages\[0\]\.selector\.name.*random"),
        ({"stages": [{"layer": 2, "selector": {"name": "topk"}}]}, r"stages\[0\]\.selector 'topk'.*relevance"),
        ({"stages": [{"layer": 2, "selector": {"name": "random"}, "merger": {"name": "nope"}}]},
         r"stages\[0\]\.merger\.name"),
        ({"stages": [{"layer": 2, "selector": {"name": "random"}, "lyer": 3}]}, r"stages\[0\]\.lyer"),
        ({"scorers": [{"name": "norm"}], "stages": [{"layer": 2, "selector": {"name": "random"}}]},
         "scorers/merger need selector.name"),
    ]
    for extra, message in bad:
        with pytest.raises(ConfigError, match=message):
            resprune.load_config({"budget": 8, **extra})


def test_overrides_reach_into_stages():
    pipe = resprune.load_pipeline("pdrop", ["stages.1.budget=0.25", "stages.0.selector=random", "budget=64"])
    assert [s.budget for s in pipe.llm_stages] == [64, 0.25, 0.5]
    assert pipe.llm_stages[0].selector.name == "random" and pipe.llm_stages[0].selector.params.seed == 0
    dart = resprune.load_pipeline("dart", ["stages.0.scorers.0.name=hidden_similarity",
                                           "stages.0.selector.params.score=hidden_similarity"])
    assert dart.llm_stages[0].scorers[0][1].name == "hidden_similarity"
    both = resprune.load_pipeline("fastv", selector="uniform")  # an input stage in front of FastV's
    assert both.input_stage is not None and both.llm_stages[0].layer == 2
    assert "then layer 2" in both.summary()


# --- costs ---------------------------------------------------------------------------------------

DIMS = LLMDims(hidden=64, intermediate=128, layers=6, kv_heads=2, head_dim=16)


@given(st.integers(1, 500), st.integers(1, 5), st.integers(1, 500))
def test_a_schedule_sums_eq18_layer_by_layer(t0, layer, t1):
    assert prefill_flops(DIMS, [(0, t0)]) == prefill_flops(DIMS, t0)
    per_layer = [prefill_flops(LLMDims(64, 128, 1, 2, 16), t) for t in [t0] * layer + [t1] * (6 - layer)]
    assert prefill_flops(DIMS, [(0, t0), (layer, t1)]) == pytest.approx(sum(per_layer))
    assert kv_cache_bytes(DIMS, [(0, t0), (layer, t1)]) == (
        kv_cache_bytes(LLMDims(64, 128, layer, 2, 16), t0) + kv_cache_bytes(LLMDims(64, 128, 6 - layer, 2, 16), t1))
    assert layer_tokens(6, [(layer, t1), (0, t0)]) == [t0] * layer + [t1] * (6 - layer)


def test_a_schedule_starts_at_layer_zero():
    with pytest.raises(ValueError, match="starts at layer 0"):
        prefill_flops(DIMS, [(2, 10)])


@pytest.mark.parametrize("scope", ["global", "per_tile"])
def test_merged_features_land_at_their_places_across_tiles(scope):
    """A merger whose output is the kept tokens' own features (contextual, share 0) changes
    nothing: the features are put back in the kept places' order across tiles and kept newlines."""
    from test_backbones import inputs_for, model_and_processor

    model, proc = model_and_processor("llava_next")
    inputs = inputs_for("llava_next")
    topk = host().selectors.get("topk")({"score": "norm"})
    plain = resprune.Pipeline(topk, budget=0.5, scorers=["norm"])
    merged = resprune.Pipeline(topk, budget=0.5, scorers=["norm"], merger=host().mergers.get("contextual")({"share": 0.0}))
    params = {"scope": scope, "image_newline": "keep"}
    with torch.no_grad():
        with plain.attach(model, proc, **params) as a:
            want = model(**inputs).logits
        with merged.attach(model, proc, **params) as b:
            got = model(**inputs).logits
    assert all(s.features is not None for s in b.selections)
    assert [s.kept.tolist() for s in a.selections] == [s.kept.tolist() for s in b.selections]
    assert torch.equal(got, want)
