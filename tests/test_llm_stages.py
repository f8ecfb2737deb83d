"""Stages inside the LLM on tiny random models: identity, equivalence to masking, scores, restore.

The reference for pruned generation is independent of ``resprune.llm_pruning``: the
*unpruned* model recomputes the whole sequence at every step (no cache), and forward
pre-hooks on the decoder layers >= K mask the dropped visual columns out of attention (the
"mask" variant). Dropping the columns (what the pipeline does, with a shorter KV cache) must
give the same tokens and allclose logits.
"""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import resprune
from resprune.stages import Stage
from resprune.tiny import tiny_inputs, tiny_lvlm

from test_backbones import PROMPTS, own_embeddings_for_beams, photos

TYPES = ("llava", "llava_next", "qwen2_5_vl", "gemma3", "qwen3_vl", "internvl")


@functools.cache
def deep_model(model_type: str, layers: int = 4, attn: str = "sdpa"):
    return tiny_lvlm(model_type, seed=1, attn_implementation=attn, text_layers=layers)


def inputs_for(model_type: str, batch: int):
    _, proc = deep_model(model_type)
    return tiny_inputs(model_type, proc, photos()[:batch], PROMPTS[:batch])


def fastv(budget, layer=2, query="last") -> Stage:
    return Stage(resprune.get_host().selectors.get("topk")({"score": "llm_attention"}), budget=budget, layer=layer,
                 scorers=[resprune.get_host().scorers.get("llm_attention")({"query": query})])


def greedy(model, inputs, **kw):
    kw = {"max_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True, "output_logits": True, **kw}
    return model.generate(**inputs, **kw)


def keep_masks(model, inputs, stages) -> dict[int, torch.Tensor]:
    """layer -> bool [B, L]: the columns still attended to from that layer on (cumulative over stages)."""
    ids = inputs["input_ids"]
    mask = inputs["attention_mask"].bool()
    visual = [t for t in (model.config.image_token_id, getattr(model.config, "video_token_id", None)) if t is not None]
    flat = (torch.isin(ids, torch.tensor(visual)) & mask).nonzero()  # images and videos, in sequence order
    keep = torch.ones_like(ids, dtype=torch.bool)
    out = {}
    for record in stages:
        offset = 0
        sizes = sorted(record.selections, key=lambda s: s.image)
        for sel in sizes:
            cols = flat[offset: offset + sel.n]
            dropped = torch.ones(sel.n, dtype=torch.bool)
            dropped[sel.kept] = False
            keep[cols[dropped, 0], cols[dropped, 1]] = False
            offset += sel.n
        out[record.layer] = keep.clone()
    return out


class MaskedReference:
    """Hooks that mask dropped key columns in layers >= K of the unpruned model (no dropping).

    ``masks``: layer -> bool ``[B, L0]`` columns of the prompt still attended to from that layer
    on. Works with and without a cache, and with generate's beam expansion of the rows.
    """

    def __init__(self, model, masks: dict[int, torch.Tensor]) -> None:
        self.layers = model.model.language_model.layers
        self.masks = masks
        self.handles = [self.layers[i].register_forward_pre_hook(self._hook(i), with_kwargs=True)
                        for i in range(len(self.layers))]
        self.eager = model.config.text_config._attn_implementation == "eager"

    def _hook(self, index):
        def hook(module, args, kwargs):
            active = [k for k in self.masks if k <= index]
            if not active:
                return None
            hidden = args[0]
            b, q = hidden.shape[:2]
            cache = kwargs.get("past_key_values")
            past = cache.layers[index].get_seq_length() if cache is not None and len(cache.layers) > index else 0
            kv = past + q
            m = kwargs.get("attention_mask")
            if m is None:
                allowed = torch.ones(q, kv, dtype=torch.bool).tril(kv - q)[None, None].expand(b, 1, q, kv)
            else:
                allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
            keep = self.masks[max(active)]
            keep = keep.repeat_interleave(b // keep.shape[0], 0)
            cols = torch.cat([keep, torch.ones(b, kv - keep.shape[1], dtype=torch.bool)], 1)
            allowed = allowed & cols[:, None, None, :]
            diag = torch.zeros(q, kv, dtype=torch.bool)
            diag[torch.arange(q), past + torch.arange(q)] = True
            allowed = allowed | diag[None, None]  # a dropped (or padding) query still sees itself: no NaN rows
            if self.eager:
                allowed = torch.zeros(allowed.shape, dtype=hidden.dtype).masked_fill(~allowed,
                                                                                    torch.finfo(hidden.dtype).min)
            return args, {**kwargs, "attention_mask": allowed}

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def reference_generate(model, inputs, masks, steps):
    """Greedy decoding without a cache: the whole sequence recomputed at every step, masked."""
    ref = MaskedReference(model, masks)
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    logits = []
    try:
        for _ in range(steps):
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=am, use_cache=False, **extra)
            step = out.logits[:, -1]
            logits.append(step)
            nxt = step.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            am = torch.cat([am, torch.ones_like(nxt)], 1)
            if "mm_token_type_ids" in extra:  # Qwen2.5-VL: the new tokens are text
                extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(nxt)], 1)
    finally:
        ref.remove()
    return ids, logits


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("batch", [1, 2])
def test_keep_all_at_every_stage_is_bit_identical(model_type, batch):
    model, proc = deep_model(model_type)
    inputs = inputs_for(model_type, batch)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
        ref = greedy(model, inputs)
    pipe = resprune.Pipeline(None, budget=1.0, stages=[fastv(1.0, layer=1), fastv(1.0, layer=3)])
    with pipe.attach(model, proc) as attached, torch.no_grad():
        logits = model(**inputs).logits
        out = greedy(model, inputs)
        assert [r.layer for r in attached.last.stages] == [1, 3]
    assert torch.equal(logits, ref_logits)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pruned_generate_equals_masked_reference(model_type, batch, attn):
    model, proc = deep_model(model_type, attn=attn)
    inputs = inputs_for(model_type, batch)
    pipe = resprune.Pipeline(None, budget=0.5, stages=[fastv(0.5, layer=1), fastv(0.5, layer=3, query="instruction")])
    with pipe.attach(model, proc) as attached, torch.no_grad():
        out = greedy(model, inputs)
        records = attached.last.stages
    assert [r.layer for r in records] == [1, 3]
    for first, second in zip(records[0].selections, records[1].selections):
        assert first.k == pipe.llm_stages[0].budget_for(first.n)
        assert set(second.kept.tolist()) <= set(first.kept.tolist())  # stage 2 prunes what stage 1 kept
    ids, logits = reference_generate(model, inputs, keep_masks(model, inputs, records), 4)
    assert torch.equal(out.sequences, ids)
    for a, b in zip(out.logits, logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["llava", "qwen2_5_vl", "qwen3_vl"])
def test_pruned_forward_with_input_stage_then_llm_stage(model_type):
    """Input-stage pruning then a stage at layer 2: the forward's logits at the output columns
    equal the masked reference's at the same original columns."""
    model, proc = deep_model(model_type)
    inputs = inputs_for(model_type, 2)
    pipe = resprune.Pipeline("uniform", budget=0.75, stages=[fastv(0.5, layer=2)])
    with pipe.attach(model, proc) as attached, torch.no_grad():
        logits = model(**inputs).logits
        batch = attached.last
    out_cols = batch.output_columns
    assert logits.shape[1] == out_cols.shape[1] < inputs["input_ids"].shape[1]
    # reference: the unpruned model with the input stage's drops masked out of the prompt (positions as
    # the injector gives them) and the layer-2 drops masked from layer 2 on
    from test_backbones import masked_reference_inputs

    ref_inputs = masked_reference_inputs(model, model_type, inputs, attached, "forward")
    keep2 = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    rows = torch.arange(2)[:, None].expand_as(out_cols)
    keep2[rows[out_cols >= 0], out_cols[out_cols >= 0]] = True
    ref = MaskedReference(model, {2: keep2})
    try:
        with torch.no_grad():
            ref_logits = model(**ref_inputs).logits
    finally:
        ref.remove()
    for r in range(2):
        valid = out_cols[r] >= 0
        torch.testing.assert_close(logits[r, valid], ref_logits[r, out_cols[r, valid]], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("mode", [{"num_beams": 2}, {"num_beams": 2, "num_return_sequences": 2}])
def test_beams_equal_the_masked_reference(model_type, mode):
    """Beam search (rows expanded by generate before the prefill) against the masked model with
    its full-length cache."""
    model, proc = deep_model(model_type)
    inputs = inputs_for(model_type, 2)
    pipe = resprune.Pipeline(None, budget=6, stages=[fastv(6, layer=2)])
    kw = {"max_new_tokens": 3, "do_sample": False, "return_dict_in_generate": True, "output_scores": True, **mode}
    with pipe.attach(model, proc) as attached, torch.no_grad():
        out = model.generate(**inputs, **kw)
        records = attached.last.stages
    assert [s.k for s in records[0].selections] == [6, 6]
    ref = MaskedReference(model, keep_masks(model, inputs, records))
    try:
        with torch.no_grad():
            expected = model.generate(**own_embeddings_for_beams(model, inputs), **kw)
    finally:
        ref.remove()
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(out.sequences_scores, expected.sequences_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("query", ["last", "instruction"])
def test_attention_scores_equal_the_eager_rows(query, model_type):
    model, proc = deep_model(model_type, attn="eager")
    inputs = inputs_for(model_type, 2)
    with torch.no_grad():
        eager = model(**inputs, output_attentions=True).attentions[1]  # layer K-1 = 1, [B, H, L, L]
    pipe = resprune.Pipeline(None, budget=1.0, stages=[fastv(1.0, layer=2, query=query)])
    with pipe.attach(model, proc) as attached, torch.no_grad():
        model(**inputs)
        sels = attached.last.stages[0].selections
    ids, am = inputs["input_ids"], inputs["attention_mask"].bool()
    image = (ids == model.config.image_token_id) & am
    for sel in sels:
        r = sel.row
        cols = image[r].nonzero().squeeze(1)
        last = int(am[r].nonzero().max())
        if query == "last":
            rows = torch.tensor([last])
        else:
            rows = torch.arange(int(cols.max()) + 1, last + 1)
            rows = rows[am[r, rows]]
        expected = eager[r][:, rows][:, :, cols].mean(0).mean(0)  # heads, then query rows
        torch.testing.assert_close(sel.scores["llm_attention"], expected, atol=1e-6, rtol=1e-5)


def test_restored_exactly_after_an_exception_mid_generate():
    model, proc = deep_model("qwen2_5_vl")
    inputs = inputs_for("qwen2_5_vl", 2)
    lm = model.model.language_model
    impl = lm.config._attn_implementation
    pipe = resprune.Pipeline(None, budget=4, stages=[fastv(4, layer=2)])

    class Boom(Exception):
        pass

    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            raise Boom

    with pytest.raises(Boom):
        with pipe.attach(model, proc), torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, stopping_criteria=StoppingCriteriaList([Stop()]))
    assert lm.config._attn_implementation == impl
    assert all(not layer._forward_pre_hooks for layer in lm.layers)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    from resprune import llm_pruning

    assert not llm_pruning._active
    with torch.no_grad():
        ref = greedy(deep_model("qwen2_5_vl")[0], inputs)
    fresh, _ = tiny_lvlm("qwen2_5_vl", seed=1, text_layers=4)
    with torch.no_grad():
        assert torch.equal(greedy(fresh, inputs).sequences, ref.sequences)


def test_layer_out_of_range_and_flash_attention_are_refused():
    model, proc = deep_model("llava")
    with pytest.raises(resprune.InvalidInputError, match="4 decoder layers"):
        resprune.Pipeline(None, budget=4, stages=[fastv(4, layer=4)]).attach(model, proc)
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_use_cache_false_and_labels_are_refused():
    model, proc = deep_model("llava")
    inputs = inputs_for("llava", 1)
    pipe = resprune.Pipeline(None, budget=4, stages=[fastv(4, layer=2)])
    with pipe.attach(model, proc):
        with pytest.raises(resprune.InvalidInputError, match="use_cache=False"):
            model.generate(**inputs, max_new_tokens=2, use_cache=False)
        with pytest.raises(resprune.InvalidInputError, match="labels"):
            model(**inputs, labels=inputs["input_ids"])


def test_text_embedder_inside_the_llm_is_refused_at_attach():
    model, proc = deep_model("llava")
    topk = resprune.get_host().selectors.get("topk")({"score": "relevance"})
    stage = Stage(topk, budget=4, layer=2, scorers=["text_relevance"])
    with pytest.raises(resprune.MissingContextError, match="layer 2 stage.*word-embedding"):
        resprune.Pipeline(None, budget=4, stages=[stage]).attach(model, proc)


class _HostReads(TorchDispatchMode):
    """Counts what makes the host wait for the device: scalar reads, nonzero, tolist."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "nonzero", "item"):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def _llm_host_reads(model, run) -> tuple[list[str], int]:
    """Host reads (scalar reads, nonzero) and ``tolist`` calls made inside the language model's
    forward passes while ``run()`` runs."""
    lm = model.model.language_model
    mode = _HostReads()
    lists: list[int] = []
    original = torch.Tensor.tolist

    def counting(self):
        lists.append(1)
        return original(self)

    def enter(*_):
        mode.__enter__()
        torch.Tensor.tolist = counting

    def leave(*_):
        torch.Tensor.tolist = original
        mode.__exit__(None, None, None)

    hooks = [lm.register_forward_pre_hook(enter), lm.register_forward_hook(leave)]
    try:
        run()
    finally:
        torch.Tensor.tolist = original
        for h in hooks:
            h.remove()
    return mode.reads, len(lists)


MERGING_STAGE = {"budget": 8, "stages": [{"layer": 2, "scorers": [{"name": "llm_attention"}],
                                           "selector": {"name": "topk", "params": {"score": "llm_attention"}},
                                           "merger": {"name": "contextual", "params": {"share": 0.25}}}]}


@pytest.mark.parametrize("config", ["fastv", "pdrop", "dart", MERGING_STAGE], ids=["fastv", "pdrop", "dart", "merger"])
def test_stages_inside_the_llm_add_no_host_reads_to_the_forward(config):
    """The language model's forwards (prefill and decode) read back exactly what the unpruned
    model's own mask code reads: budgets are host-side, shapes follow from them, and the
    plugins' output checks are read once after the call."""
    model, proc = deep_model("llava", layers=26)
    inputs = inputs_for("llava", 2)
    with torch.no_grad():
        baseline = _llm_host_reads(model, lambda: model.generate(**inputs, max_new_tokens=3))
    with resprune.load_pipeline(config, budget=8).attach(model, proc) as attached, torch.no_grad():
        pruned = _llm_host_reads(model, lambda: model.generate(**inputs, max_new_tokens=3))
    assert len(attached.last.stages) == len(resprune.load_pipeline(config).llm_stages)
    assert pruned == baseline


def test_a_bad_plugin_inside_the_llm_is_named_after_the_call():
    from resprune.interfaces import Scorer

    class Broken(Scorer):
        name = "broken_attention"
        output = "broken"
        requires = frozenset({"llm_attention"})

        def score(self, context):
            return context.get("llm_attention")("last") * float("nan")

    model, proc = deep_model("llava")
    inputs = inputs_for("llava", 1)
    topk = resprune.get_host().selectors.get("topk")({"score": "broken"})
    pipe = resprune.Pipeline(None, budget=4, stages=[Stage(topk, budget=4, layer=2, scorers=[Broken()])])
    with pipe.attach(model, proc), torch.no_grad():
        with pytest.raises(resprune.PluginContractError, match="broken_attention.*NaN"):
            model(**inputs)


@settings(deadline=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(TYPES), st.integers(1, 3), st.integers(1, 40), st.booleans(), st.integers(1, 2))
def test_any_layer_and_budget_equal_the_masked_reference(model_type, layer, k, instruction, batch):
    model, proc = deep_model(model_type)
    inputs = inputs_for(model_type, batch)
    pipe = resprune.Pipeline(None, budget=k, stages=[fastv(k, layer=layer,
                                                           query="instruction" if instruction else "last")])
    with pipe.attach(model, proc) as attached, torch.no_grad():
        out = greedy(model, inputs, max_new_tokens=3)
        records = attached.last.stages
    assert all(s.k == min(k, s.n) for s in records[0].selections)
    ids, logits = reference_generate(model, inputs, keep_masks(model, inputs, records), 3)
    assert torch.equal(out.sequences, ids)
    for a, b in zip(out.logits, logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


# --- Qwen3.5: a hybrid LLM (Gated DeltaNet layers between full-attention ones) -------------------


def hybrid_reference(model, inputs, masks, steps):
    """Greedy decoding without a cache, the language model run layer by layer by hand: from each
    stage's layer on, only the columns it kept (gathered, rows re-padded on the left), with the
    masks the model's own mask functions build for that shorter sequence (a causal mask for a
    full-attention layer, the 2-D padding mask for a linear one) and the kept tokens' original
    M-RoPE positions. Independent of resprune.llm_pruning (which reuses the full-length masks)."""
    from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask

    lm, config = model.model.language_model, model.model.language_model.config
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    types = inputs["mm_token_type_ids"]
    features = {}  # the model's own features of every image and video, by placeholder token
    for token, pixels, grid, encode in ((model.config.image_token_id, "pixel_values", "image_grid_thw",
                                         model.model.get_image_features),
                                        (model.config.video_token_id, "pixel_values_videos", "video_grid_thw",
                                         model.model.get_video_features)):
        if inputs.get(pixels) is not None:
            features[token] = torch.cat(encode(inputs[pixels], inputs[grid]).pooler_output)
    logits = []
    for _ in range(steps):
        embeds = model.get_input_embeddings()(ids)
        for token, values in features.items():
            embeds = embeds.masked_scatter((ids == token)[..., None], values)
        positions, _ = model.model.get_rope_index(ids, types, inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
                                                  attention_mask=am)
        hidden, mask, pos = embeds, am, positions
        current = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)  # the original column of each column
        for i, layer in enumerate(lm.layers):
            if i in masks:  # keep the columns the stage kept (and every generated token), re-padded on the left
                kept = torch.cat([masks[i], torch.ones(ids.shape[0], ids.shape[1] - masks[i].shape[1],
                                                       dtype=torch.bool)], 1) & am.bool()
                here = [(kept[r].gather(0, current[r].clamp_min(0)) & (current[r] >= 0)).nonzero().squeeze(1)
                        for r in range(ids.shape[0])]
                width = max(h.numel() for h in here)
                index = torch.stack([torch.cat([torch.zeros(width - h.numel(), dtype=torch.long), h]) for h in here])
                pad = torch.arange(width)[None] < torch.tensor([width - h.numel() for h in here])[:, None]
                hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
                current = current.gather(1, index).masked_fill(pad, -1)
                mask = (~pad).long()
                pos = positions.gather(2, current.clamp_min(0)[None].expand(3, -1, -1))
            rotary = lm.rotary_emb(hidden, pos)
            if config.layer_types[i] == "linear_attention":
                layer_mask = create_recurrent_attention_mask(config, hidden, mask)
            else:
                layer_mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=mask,
                                                past_key_values=None, position_ids=None)
            hidden = layer(hidden, position_embeddings=rotary, attention_mask=layer_mask, position_ids=None,
                           past_key_values=None)
        step = model.lm_head(lm.norm(hidden))[:, -1]
        logits.append(step)
        nxt = step.argmax(-1, keepdim=True)
        ids, am = torch.cat([ids, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
        types = torch.cat([types, torch.zeros_like(nxt)], 1)
    return ids, logits


def residual_energy_on_hidden_states(budget, layer) -> Stage:
    return Stage(resprune.get_host().selectors.get("residual_energy")({"seed": "norm"}), budget=budget, layer=layer,
                 scorers=["norm"])


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layers", [(4, 5), (1, 4)])
def test_qwen3_5_stages_at_full_and_linear_layers_equal_the_hand_run_hybrid_llm(batch, attn, layers):
    """FastV at layer 4 (it reads the attention of layer 3, a full-attention layer) and ResPrune on
    hidden states at a linear-attention layer (it reads no attention), after it (5) or before the
    first full-attention layer (1): generate with the shorter KV caches and the linear layers'
    recurrent and convolution states of the pruned sequence equals the LLM run layer by layer by
    hand without a cache."""
    model, proc = deep_model("qwen3_5", layers=8, attn=attn)
    assert model.config.text_config.layer_types[:6] == ["linear_attention"] * 3 + ["full_attention"] + \
        ["linear_attention"] * 2
    inputs = inputs_for("qwen3_5", batch)
    stages = [fastv(0.5, layer=4) if k == 4 else residual_energy_on_hidden_states(0.5, k) for k in layers]
    pipe = resprune.Pipeline(None, budget=0.5, stages=stages)
    with pipe.attach(model, proc) as attached, torch.no_grad():
        out = greedy(model, inputs)
        records = attached.last.stages
    assert [r.layer for r in records] == list(layers)
    assert all(0 < s.k < s.n for r in records for s in r.selections)
    with torch.no_grad():
        ids, logits = hybrid_reference(model, inputs, keep_masks(model, inputs, records), 4)
    assert torch.equal(out.sequences, ids)
    for a, b in zip(out.logits, logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_qwen3_5_keep_all_inside_the_llm_is_bit_identical_and_bad_layers_are_named():
    model, proc = deep_model("qwen3_5", layers=8)
    inputs = inputs_for("qwen3_5", 2)
    with torch.no_grad():
        ref = greedy(model, inputs)
    pipe = resprune.Pipeline(None, budget=1.0, stages=[fastv(1.0, layer=4), residual_energy_on_hidden_states(1.0, 6)])
    with pipe.attach(model, proc), torch.no_grad():
        out = greedy(model, inputs)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))
    with pytest.raises(resprune.IncompatibleBackboneError, match=r"layer 5 reads llm_attention.*layer 4 of "
                                                                 r"Qwen3_5ForConditionalGeneration's LLM is a "
                                                                 r"linear-attention layer.*allowed layers for this "
                                                                 r"stage: 4"):
        resprune.Pipeline(None, budget=4, stages=[fastv(4, layer=5)]).attach(model, proc)
    own = Stage(resprune.get_host().selectors.get("topk")({"score": "llm_attention"}), budget=4, layer=2,
                scorers=[resprune.get_host().scorers.get("llm_attention")({"layer": "current"})])  # PDrop's
    with pytest.raises(resprune.IncompatibleBackboneError, match=r"layer 2 reads llm_own_attention \(read at layer "
                                                                 r"K\), and layer 2 .* linear-attention layer.*allowed "
                                                                 r"layers for this stage: 3, 7\."):
        resprune.Pipeline(None, budget=4, stages=[own]).attach(model, proc)
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)


@pytest.mark.parametrize("stages", [[], [4]])
def test_qwen3_5_input_stage_pruning_equals_the_pruned_prompt_run_by_hand(stages):
    """Pruning before the LLM (then, optionally, FastV at layer 4): generate, whose Gated DeltaNet
    layers carry the recurrent and convolution states of the pruned prompt, equals the LLM run by
    hand without a cache on the prompt holding only the kept tokens (a drop "at layer 0")."""
    from types import SimpleNamespace

    model, proc = deep_model("qwen3_5", layers=8)
    inputs = inputs_for("qwen3_5", 2)
    selector = resprune.get_host().selectors.get("residual_energy")({"seed": "norm"})
    pipe = resprune.Pipeline(selector, budget=0.5, scorers=["norm"], stages=[fastv(0.5, layer=k) for k in stages])
    with pipe.attach(model, proc) as attached, torch.no_grad():
        out = greedy(model, inputs)
    records = [SimpleNamespace(layer=0, selections=attached.selections), *attached.last.stages]
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 4
    with torch.no_grad():
        ids, logits = hybrid_reference(model, inputs, keep_masks(model, inputs, records), 4)
    assert torch.equal(out.sequences, ids)
    for a, b in zip(out.logits, logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gemma3_stage_then_decoding_past_the_sliding_window_equals_the_masked_reference(attn):
    """Prompts longer than Gemma 3's sliding window (512 on the tiny model): after a stage, a local
    layer's cache keeps the last W - 1 of its kept tokens, and a decoding query sees the keys within
    W columns of the LLM's input before it, as the unpruned model masked (recomputed without a cache)."""
    model, proc = deep_model("gemma3", attn=attn)
    prompts = ["Describe the picture in detail, please. " * 15, "What is it? " * 50]
    inputs = tiny_inputs("gemma3", proc, photos()[:2], prompts)
    assert inputs["input_ids"].shape[1] > model.config.text_config.sliding_window
    pipe = resprune.Pipeline(None, budget=0.5, stages=[fastv(0.5, layer=2)])
    with pipe.attach(model, proc) as attached, torch.no_grad():
        out = greedy(model, inputs)
        records = attached.last.stages
    ids, logits = reference_generate(model, inputs, keep_masks(model, inputs, records), 4)
    assert torch.equal(out.sequences, ids)
    for a, b in zip(out.logits, logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
