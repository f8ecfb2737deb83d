"""Backbone injectors on tiny random models: identity, equivalence to masking, generation modes.

References are independent of the injector: the *unpruned* model run on the full prompt,
with the dropped image tokens masked out of attention and positions set as the injector
defines them (contiguous for the LLaVA family, original M-RoPE for Qwen2.5-VL and Qwen3-VL).
"""

from __future__ import annotations

import functools
from importlib import resources

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import resprune
from resprune.testing.conformance import assert_equal_at_kept_columns, masked_out_dropped, pruned_forward_positions
from resprune.testing.tiny import tiny_inputs, tiny_lvlm

TYPES = ("llava", "llava_next", "qwen2_5_vl", "llava_onevision", "gemma3", "qwen3_vl", "internvl")
CONFIG = {"llava": "resprune-llava15", "llava_next": "resprune-llava-next", "qwen2_5_vl": "resprune-qwen2.5-vl",
          "llava_onevision": "resprune-llava-onevision", "gemma3": "resprune-gemma3", "qwen3_vl": "resprune-qwen3-vl",
          "internvl": "resprune-internvl"}
GLOBAL_BUDGET = {"internvl": ["backbone.params.scope=global"]}
"""Overrides for the tests of any budget: InternVL's default budget per tile refuses one below an image's tiles."""
MROPE = ("qwen2_5_vl", "qwen3_vl")  # original M-RoPE positions kept
PROMPTS = ["What is shown in the picture?", "Describe the colours of the sky, please."]


@functools.cache
def photos() -> list[Image.Image]:
    folder = resources.files("resprune") / "data" / "photos"
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".jpg"))
    sizes = [(120, 90), (84, 112), (100, 100), (140, 70)]
    return [Image.open(f).convert("RGB").resize(s) for f, s in zip(files, sizes)]


@functools.cache
def model_and_processor(model_type: str, attn: str = "sdpa"):
    return tiny_lvlm(model_type, seed=0, attn_implementation=attn)


def inputs_for(model_type: str, batch: int = 2):
    _, proc = model_and_processor(model_type)
    return tiny_inputs(model_type, proc, photos()[:batch], PROMPTS[:batch])


def pipeline(model_type: str, budget, **overrides):
    return resprune.load_pipeline(CONFIG[model_type], GLOBAL_BUDGET.get(model_type, []), budget=budget, **overrides)


def generate(model, inputs, **kw):
    kw = {"max_new_tokens": 5, "do_sample": False, "return_dict_in_generate": True, "output_logits": True, **kw}
    return model.generate(**inputs, **kw)


def masked_reference_inputs(model, model_type, inputs, attached, call):
    """The unpruned inputs with the dropped image tokens masked out, positions as the injector has them."""
    ref = masked_out_dropped(model, inputs, attached)
    if model_type in MROPE:
        ids, mask = inputs["input_ids"], ref["attention_mask"]
        types = inputs["mm_token_type_ids"]
        pos3, _ = model.model.get_rope_index(ids, types, inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
        if call == "generate":
            text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            ref["position_ids"] = torch.cat([text[None], pos3], dim=0)
        else:
            ref["position_ids"] = pos3
    elif call == "forward":  # the pruned forward sees positions 0..L'-1 along its (re-padded) rows
        ref["position_ids"] = pruned_forward_positions(attached.last.columns, inputs["input_ids"])
    return own_embeddings_for_beams(model, ref) if call == "generate" else ref


def own_embeddings_for_beams(model, inputs):
    """InternVL3's inputs for ``generate`` with the model's own input embeddings in place of
    ``pixel_values`` (other models: unchanged). Its generate expands ``pixel_values`` tile by tile for
    beams (transformers' generic repeat_interleave), which mixes up the tiles of a multi-tile image."""
    if model.config.model_type != "internvl":
        return inputs
    inputs = dict(inputs)
    ids = inputs["input_ids"]
    features = model.model.get_image_features(pixel_values=inputs.pop("pixel_values"), vision_feature_layer=-1,
                                              vision_feature_select_strategy="default").pooler_output
    inputs["inputs_embeds"] = model.get_input_embeddings()(ids).masked_scatter(
        (ids == model.config.image_token_id)[..., None], features.reshape(-1, features.shape[-1]))
    return inputs


def pruned_prompt_inputs(model, inputs, selections):
    """The pruned prompt built here by hand, for a model whose layers cannot mask a token out
    (Qwen3.5's linear attention): ``(kwargs of the model's forward, columns)``. Each row keeps its
    text and the kept image tokens (``selections``), in order, left-padded; the embeddings are the
    model's own image features at the kept tokens; positions are the unpruned prompt's M-RoPE
    positions at the kept columns. ``columns [B, L']``: the original column of each (-1: padding)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    image = (ids == model.config.image_token_id) & mask
    features = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
    keep, flat, offset, kept = mask & ~image, image.nonzero(), 0, []
    for sel in sorted(selections, key=lambda s: s.image):
        cols = flat[offset: offset + sel.n][sel.kept]
        keep[cols[:, 0], cols[:, 1]] = True
        kept.append(features[offset: offset + sel.n][sel.kept])
        offset += sel.n
    length = int(keep.sum(1).max())
    columns = torch.full((ids.shape[0], length), -1)
    for r in range(ids.shape[0]):
        c = keep[r].nonzero().squeeze(1)
        columns[r, length - c.numel():] = c
    valid = columns >= 0
    new_ids = ids.gather(1, columns.clamp_min(0))
    embeds = model.get_input_embeddings()(new_ids)
    embeds[(new_ids == model.config.image_token_id) & valid] = torch.cat(kept)
    positions, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                              attention_mask=inputs["attention_mask"])
    positions = positions.gather(2, columns.clamp_min(0)[None].expand(3, -1, -1)) * valid
    return {"inputs_embeds": embeds, "attention_mask": valid.long(), "position_ids": positions}, columns


def at_original_columns(values, columns, length):
    """``values [B, L', ...]`` of a pruned prompt put at their original columns ``[B, L, ...]`` (NaN elsewhere)."""
    out = torch.full((values.shape[0], length, *values.shape[2:]), float("nan"), dtype=values.dtype)
    for r in range(values.shape[0]):
        valid = columns[r] >= 0
        out[r, columns[r][valid]] = values[r, valid]
    return out


# --- keep-all identity --------------------------------------------------------------------


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 2])
def test_keep_all_is_bit_identical(model_type, attn, batch):
    model, proc = model_and_processor(model_type, attn)
    inputs = tiny_inputs(model_type, proc, photos()[:batch], PROMPTS[:batch])
    before = set(model.__dict__)
    with torch.no_grad():
        logits = model(**inputs).logits
        gen = generate(model, inputs)
    with pipeline(model_type, 100_000).attach(model, proc) as attached, torch.no_grad():
        assert torch.equal(model(**inputs).logits, logits)
        pruned = generate(model, inputs)
        assert all(s.k == s.n for s in attached.selections)
    assert torch.equal(pruned.sequences, gen.sequences)
    for a, b in zip(pruned.logits, gen.logits):
        assert torch.equal(a, b)
    assert set(model.__dict__) == before


# --- pruned equivalence ---------------------------------------------------------------------


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("budget", [1, 5, 0.3])
def test_pruned_forward_equals_masked_unpruned_model(model_type, budget):
    model, proc = model_and_processor(model_type)
    inputs = inputs_for(model_type)
    with pipeline(model_type, budget).attach(model, proc) as attached, torch.no_grad():
        logits = model(**inputs).logits
        ref_inputs = masked_reference_inputs(model, model_type, inputs, attached, "forward")
    with torch.no_grad():
        ref = model(**ref_inputs).logits
    assert_equal_at_kept_columns(logits, ref, attached.last.columns)
    assert [s.k for s in attached.selections] == [resprune.resolve_budget(budget, s.n) for s in attached.selections]


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("mode", [
    {},
    {"num_beams": 2},
    {"num_return_sequences": 2, "do_sample": True, "top_k": 5},
    {"num_beams": 2, "num_return_sequences": 2},
])
def test_pruned_generate_equals_masked_unpruned_model(model_type, mode):
    model, proc = model_and_processor(model_type)
    inputs = inputs_for(model_type)
    with pipeline(model_type, 4).attach(model, proc) as attached, torch.no_grad():
        torch.manual_seed(0)
        out = generate(model, inputs, **mode)
        ref_inputs = masked_reference_inputs(model, model_type, inputs, attached, "generate")
    with torch.no_grad():
        torch.manual_seed(0)
        ref = generate(model, ref_inputs, **mode)
    assert out.sequences.shape == ref.sequences.shape
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_generate_returns_the_callers_prompt_then_new_tokens():
    model, proc = model_and_processor("llava")
    inputs = inputs_for("llava")
    with pipeline("llava", 3).attach(model, proc):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        positional = model.generate(inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                    attention_mask=inputs["attention_mask"], max_new_tokens=4, do_sample=False)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert torch.equal(out, positional)


@pytest.mark.parametrize("side", ["left", "right"])
def test_rewritten_rows_keep_their_columns_in_order_on_the_callers_padding_side(side):
    model, proc = model_and_processor("llava")
    tok = proc.tokenizer
    old = tok.padding_side
    tok.padding_side = side
    try:
        text = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                 "text": q}]}], add_generation_prompt=True, tokenize=False)
                for q in ("What is it?", "Which colours dominate the picture, and where are they?")]
        inputs = proc(images=photos()[:2], text=text, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = old
    with pipeline("llava", 16).attach(model, proc) as attached, torch.no_grad():
        batch = attached.prune(inputs)
    mask = inputs["attention_mask"].bool()
    for r in range(2):
        cols = batch.columns[r]
        real = cols[cols >= 0]
        assert torch.equal(real, real.sort().values)  # original order
        pads = (cols < 0).nonzero().flatten()
        if len(pads):  # padding sits on the caller's side, all together
            assert (pads == torch.arange(len(pads)) if side == "left" else
                    pads == torch.arange(len(cols) - len(pads), len(cols))).all()
        placeholders = (inputs["input_ids"][r] == model.config.image_token_id) & mask[r]
        assert int((~placeholders & mask[r]).sum()) + 16 == len(real)  # every text column and 16 image ones
    assert torch.equal(batch.attention_mask.bool(), batch.columns >= 0)


# --- several images in one prompt, text-only rows --------------------------------------------


@pytest.mark.parametrize("model_type", ["llava", "qwen2_5_vl"])
def test_several_images_in_one_prompt_each_get_their_own_budget(model_type):
    model, proc = model_and_processor(model_type)
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare the two pictures."}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                    tokenize=False)
    single = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                       "text": "What is it?"}]}], add_generation_prompt=True, tokenize=False)
    inputs = proc(images=photos()[:3], text=[text, single], padding=True, return_tensors="pt")
    with pipeline(model_type, 0.5).attach(model, proc) as attached, torch.no_grad():
        out = generate(model, inputs)
        ref_inputs = masked_reference_inputs(model, model_type, inputs, attached, "generate")
    assert [s.row for s in attached.selections] == [0, 0, 1]
    assert all(s.k == resprune.resolve_budget(0.5, s.n) for s in attached.selections)
    assert attached.selections[0].text == "Compare the two pictures."
    with torch.no_grad():
        ref = generate(model, ref_inputs)
    assert torch.equal(out.sequences, ref.sequences)


def test_text_only_row_in_a_qwen_batch():
    model, proc = model_and_processor("qwen2_5_vl")
    inputs = tiny_inputs("qwen2_5_vl", proc, [photos()[0], None], PROMPTS)
    with pipeline("qwen2_5_vl", 3).attach(model, proc) as attached, torch.no_grad():
        out = generate(model, inputs)
        ref_inputs = masked_reference_inputs(model, "qwen2_5_vl", inputs, attached, "generate")
    assert [s.row for s in attached.selections] == [0]
    with torch.no_grad():
        ref = generate(model, ref_inputs)
    assert torch.equal(out.sequences, ref.sequences)


# --- Qwen2.5-VL positions -------------------------------------------------------------------


def test_qwen_kept_tokens_keep_their_mrope_positions_and_rope_deltas_decode_right():
    model, proc = model_and_processor("qwen2_5_vl")
    inputs = inputs_for("qwen2_5_vl", batch=1)
    with torch.no_grad():
        pos3, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                             inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    saved = model.model.rope_deltas
    with pipeline("qwen2_5_vl", 4).attach(model, proc) as attached, torch.no_grad():
        out = model(**inputs, use_cache=True)
        batch = attached.last
        cols = batch.columns[0]
        assert torch.equal(batch.extra["position_ids"][:, 0], pos3[:, 0, cols])
        # manual decode without position_ids relies on rope_deltas: it must match generate
        # (no attention_mask either: transformers 5.17 cannot decode Qwen with a growing 2-D
        # mask and no position_ids, even unpruned)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        gen = generate(model, inputs, max_new_tokens=2)
    torch.testing.assert_close(step.logits[:, -1], gen.logits[1], rtol=0, atol=1e-5)
    assert model.model.rope_deltas is saved


def test_qwen_refuses_cls_attention_before_patching():
    model, proc = model_and_processor("qwen2_5_vl")
    with pytest.raises(resprune.MissingContextError, match=r"cls_attention.*qwen2_5_vl"), \
            pytest.warns(UserWarning, match="config is for 'llava' models"):
        pipeline("llava", 4).attach(model, proc)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__


# --- CLS attention -------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llava", "llava_next"])
def test_cls_attention_equals_eager_attention_weights(model_type):
    model, proc = model_and_processor(model_type)
    inputs = inputs_for(model_type)
    pipe = resprune.Pipeline("topk", budget=3, scorers=["cls_attention"])
    pipe.selector = resprune.selection.make_selector("topk", {"score": "cls_attention"})
    with pipe.attach(model, proc) as attached, torch.no_grad():
        model(**inputs)
    eager, _ = tiny_lvlm(model_type, seed=0, attn_implementation="eager")
    layer = model.config.vision_feature_layer
    with torch.no_grad():
        pv = inputs["pixel_values"]
        if pv.dim() == 5:  # LLaVA-NeXT: tiles of every image, as the model flattens them
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            counts = [image_size_to_num_patches(s, model.config.image_grid_pinpoints,
                                                model.config.vision_config.image_size) for s in inputs["image_sizes"]]
            pv = torch.cat([p[:c] for p, c in zip(pv, counts)])
        att = eager.model.vision_tower(pv, output_attentions=True).attentions
    n_layers = model.config.vision_config.num_hidden_layers
    weights = att[n_layers + layer].mean(1)[:, 0, 1:]  # [tiles, patches]
    if model_type == "llava":
        for i, sel in enumerate(attached.selections):
            torch.testing.assert_close(sel.scores["cls_attention"], weights[i], rtol=1e-5, atol=1e-6)
    else:
        first = 0
        for sel in attached.selections:
            base = sel.geometry.layout["tile"] == 0
            got = sel.scores["cls_attention"][base & ~sel.geometry.layout["newline"]]
            torch.testing.assert_close(got, weights[first], rtol=1e-5, atol=1e-6)
            first += int(sel.geometry.layout["tile"].max()) + 1


# --- LLaVA-NeXT policies -------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["candidate", "keep", "drop"])
@pytest.mark.parametrize("scope", ["global", "per_tile"])
def test_llava_next_scope_and_newline_policy(policy, scope):
    model, proc = model_and_processor("llava_next")
    inputs = inputs_for("llava_next")
    budget = 12
    pipe = resprune.load_pipeline("resprune-llava-next", budget=budget)
    with pipe.attach(model, proc, scope=scope, image_newline=policy) as attached, torch.no_grad():
        model(**inputs)
    for sel in attached.selections:
        newline = sel.geometry.layout["newline"]
        tiles = sel.geometry.layout["tile"]
        kept_nl = int(newline[sel.kept].sum())
        assert sel.k == len(set(sel.kept.tolist()))
        if policy == "keep":
            assert kept_nl == int(newline.sum())
            assert sel.k == max(budget, int(newline.sum()))
        elif policy == "drop":
            assert kept_nl == 0 and sel.k == budget
        else:
            assert sel.k == budget
        if scope == "per_tile" and policy == "drop":
            # each tile gets its share of the budget (largest remainder)
            counts = torch.bincount(tiles[~newline], minlength=int(tiles.max()) + 1).float()
            share = counts / counts.sum() * budget
            got = torch.bincount(tiles[sel.kept], minlength=len(counts)).float()
            assert bool(((got - share).abs() < 1).all())


# --- errors leave the model as it was -------------------------------------------------------


def test_unsupported_model_type_is_a_clear_error():
    class Config:
        model_type = "blip_2"

    class Model:
        config = Config()

    with pytest.raises(resprune.IncompatibleBackboneError, match=r"blip_2.*llava.*qwen2_5_vl"):
        pipeline("llava", 4).attach(Model())


def test_image_token_count_mismatch_prompt_without_image_and_bad_budget():
    model, proc = model_and_processor("llava")
    inputs = inputs_for("llava")
    with pipeline("llava", 4).attach(model, proc):
        ids = inputs["input_ids"].clone()
        first = (ids[0] == model.config.image_token_id).nonzero()[0, 0]
        ids[0, first] = proc.tokenizer.pad_token_id
        with pytest.raises(resprune.InvalidInputError, match="image tokens"):
            model(**{**inputs, "input_ids": ids})
        no_image = proc.tokenizer(["Hello there"], return_tensors="pt")
        with pytest.raises(resprune.InvalidInputError, match="no image token"):
            model(input_ids=no_image["input_ids"], pixel_values=inputs["pixel_values"][:1])
    assert "forward" not in model.__dict__
    with pytest.raises(resprune.BudgetError):
        pipeline("llava", 1.5)
    with pytest.raises(resprune.BudgetError):
        pipeline("llava", "half")


def test_text_scorers_without_processor_fail_before_patching():
    model, _ = model_and_processor("llava")
    with pytest.raises(resprune.MissingContextError, match="processor"):
        pipeline("llava", 4).attach(model)
    assert "forward" not in model.__dict__
    with pytest.raises(resprune.MissingContextError, match="text_embedder"):
        pipeline("llava", 4).attach(model, text="a dog on the grass")
    assert "forward" not in model.__dict__
    # geometric ResPrune needs neither: it runs without a processor
    geometric = resprune.load_pipeline("resprune-llava15", budget=4, scorers=[{"name": "cls_attention"}])
    with geometric.attach(model) as attached, torch.no_grad():
        model(**inputs_for("llava"))
    assert [s.k for s in attached.selections] == [4, 4]


def test_attaching_twice_is_refused():
    model, proc = model_and_processor("llava")
    with pipeline("llava", 4).attach(model, proc):
        with pytest.raises(resprune.InvalidInputError, match="already"):
            pipeline("llava", 4).attach(model, proc)
    assert "forward" not in model.__dict__


# --- property test over budgets and image sizes ----------------------------------------------


@pytest.mark.parametrize("model_type", TYPES)
def test_random_budgets_and_image_sizes_match_masked_reference(model_type):
    model, proc = model_and_processor(model_type)

    @settings(max_examples=8, deadline=None)
    @given(st.integers(40, 160), st.integers(40, 160), st.one_of(st.integers(1, 60), st.floats(0.05, 1.0)),
           st.integers(0, 3))
    def check(w, h, budget, which):
        image = photos()[which].resize((w, h))
        inputs = tiny_inputs(model_type, proc, [image, photos()[(which + 1) % 4]], PROMPTS)
        with pipeline(model_type, budget).attach(model, proc) as attached, torch.no_grad():
            out = generate(model, inputs, max_new_tokens=3)
            ref_inputs = masked_reference_inputs(model, model_type, inputs, attached, "generate")
        for s in attached.selections:
            assert s.k == resprune.resolve_budget(budget, s.n)
            assert torch.equal(s.kept, s.kept.sort().values) and set(s.order.tolist()) == set(s.kept.tolist())
        with torch.no_grad():
            ref = generate(model, ref_inputs, max_new_tokens=3)
        assert torch.equal(out.sequences, ref.sequences)
        for a, b in zip(out.logits, ref.logits):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

    check()


def test_backbone_params_are_validated_with_the_config():
    pipe = resprune.load_pipeline("resprune-llava-next", ["backbone.params.scope=per_tile"])
    assert pipe.config.backbone.params.scope == "per_tile"
    with pytest.raises(resprune.ConfigError, match=r"backbone.params.*scope.*'global', 'per_tile'"):
        resprune.load_pipeline("resprune-llava-next", ["backbone.params.scope=tiles"])
    with pytest.raises(resprune.ConfigError, match=r"backbone.model_type.*llava_nxt.*llava_next"):
        resprune.load_pipeline("resprune-llava-next", ["backbone.model_type=llava_nxt"])
    with pytest.raises(resprune.ConfigError, match=r"backbone.params.scope: unknown parameter of injector 'llava'"):
        resprune.load_pipeline("resprune-llava15", ["backbone.params.scope=global"])


def test_config_backbone_params_reach_the_injector():
    model, proc = model_and_processor("llava_next")
    pipe = resprune.load_pipeline("resprune-llava-next", ["backbone.params.image_newline=drop"], budget=40)
    with pipe.attach(model, proc) as attached, torch.no_grad():
        model(**inputs_for("llava_next"))
    for sel in attached.selections:
        assert int(sel.geometry.layout["newline"][sel.kept].sum()) == 0


@pytest.mark.parametrize("prompt, expected", [
    ("<s>USER: <image>\nWhat is the cat doing? ASSISTANT:", "What is the cat doing?"),  # LLaVA-1.5
    ("<s>[INST] <image>\nCount the birds. [/INST]", "Count the birds."),  # LLaVA-NeXT (Mistral)
    ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n<|vision_start|><|vision_end|>"
     "Read the sign.<|im_end|>\n<|im_start|>assistant\n", "Read the sign."),  # Qwen2.5-VL
    ("USER: first question ASSISTANT: an answer</s>USER: <image>\nsecond question ASSISTANT:", "second question"),
    ("no template at all <image>", "no template at all"),
])
def test_instruction_is_the_last_user_turn_without_template(prompt, expected):
    from resprune.injection import PlaceholderInjector
    from resprune.prompts import instruction_text

    specials = ["<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
    assert instruction_text(prompt, PlaceholderInjector.instruction_patterns, specials) == expected


# --- Gemma 3: the bidirectional image blocks follow the kept tokens ------------------------------


def test_gemma3_mask_over_the_kept_tokens_is_the_models_own_rule_for_a_prompt_holding_only_them():
    """In the pruned forward, every query attends to the keys before it, and an image's kept tokens
    also to each other both ways (Gemma 3's rule: one bidirectional block per run of image
    tokens), never to padding; built here by hand from the pruned prompt and compared with the
    full-attention mask the LLM received (eager, so the mask is a tensor)."""
    model, proc = model_and_processor("gemma3", "eager")
    inputs = inputs_for("gemma3")
    seen = {}

    def grab(module, args, kwargs):
        seen["mask"] = kwargs["attention_mask"]["full_attention"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with pipeline("gemma3", 5).attach(model, proc) as attached, torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    batch = attached.last
    image = batch.input_ids == model.config.image_token_id
    valid = batch.attention_mask.bool()
    b, length = image.shape
    block = (image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]).cumsum(1)  # run number of each image token
    expected = torch.zeros(b, length, length, dtype=torch.bool)
    for r in range(b):
        for i in range(length):
            for j in range(length):
                same_image = bool(image[r, i] and image[r, j] and block[r, i] == block[r, j])
                expected[r, i, j] = bool(valid[r, j]) and (j <= i or same_image)
    got = seen["mask"][:, 0]
    allowed = got if got.dtype == torch.bool else got == 0
    rows = valid  # padded queries are not compared (their rows are the model's business)
    assert torch.equal(allowed[rows], expected[rows])
    assert int(image.sum()) == 10 and any(expected[r, i, j] for r in range(b) for i in range(length)
                                          for j in range(i + 1, length))  # a kept token sees a later one


def test_gemma3_pan_and_scan_crops_are_images_of_their_own_and_a_bad_token_type_ids_is_named():
    model, proc = model_and_processor("gemma3")
    wide = photos()[0].resize((900, 300))
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                     "text": "What is on the table?"}]}], add_generation_prompt=True, tokenize=False)
    inputs = proc(images=[[wide]], text=[text], return_tensors="pt", do_pan_and_scan=True,
                  pan_and_scan_min_crop_size=64)
    assert inputs["pixel_values"].shape[0] == 4  # the image and 3 crops
    with torch.no_grad():
        reference = model(**inputs).logits
        with pipeline("gemma3", 100_000).attach(model, proc):
            assert torch.equal(model(**inputs).logits, reference)
        with pipeline("gemma3", 9).attach(model, proc) as attached:
            model(**inputs)
        assert [(s.k, s.n) for s in attached.selections] == [(9, 36)] * 4
        bad = dict(inputs, token_type_ids=inputs["token_type_ids"][:, :-1])
        with pipeline("gemma3", 9).attach(model, proc), pytest.raises(resprune.InvalidInputError,
                                                                      match="token_type_ids has shape"):
            model(**bad)


# --- Qwen3-VL: DeepStack features follow the kept tokens -----------------------------------------


def _planted_deepstack(model, seed: int = 3):
    """Make the vision tower return DeepStack features drawn at random (distinct for every token and
    layer) and give them back per layer, ``[all tokens of the call, D]``."""
    original = model.model.get_image_features
    planted = []

    def get_image_features(pixel_values, image_grid_thw=None, **kwargs):
        out = original(pixel_values, image_grid_thw, **kwargs)
        gen = torch.Generator().manual_seed(seed)
        out.deepstack_features = [torch.randn(f.shape, generator=gen) for f in out.deepstack_features]
        planted[:] = out.deepstack_features
        return out

    model.model.get_image_features = get_image_features
    return planted


@pytest.mark.parametrize("stage_layer", [None, 1])
def test_qwen3_vl_each_kept_token_gets_its_own_deepstack_features_and_no_dropped_one_lands(stage_layer):
    """Planted DeepStack features: after each DeepStack layer the hidden states gain, at each kept
    visual token's column, exactly that token's feature for the layer, and nothing anywhere else;
    with a stage inside the LLM at layer 1 (DeepStack still pending there), the layer-1 features
    are those of the tokens the stage kept, at their columns in its shorter sequence."""
    model, proc = tiny_lvlm("qwen3_vl", seed=0, text_layers=4)
    planted = _planted_deepstack(model)
    inputs = inputs_for("qwen3_vl")
    stages = [] if stage_layer is None else [resprune.Stage(
        resprune.get_host().selectors.get("topk")({"score": "norm"}), budget=0.5, layer=stage_layer,
        scorers=["norm"])]
    pipe = resprune.Pipeline(resprune.get_host().selectors.get("residual_energy")({"seed": "norm"}), budget=0.5,
                             scorers=["norm"], stages=stages)
    layers = model.model.language_model.layers
    before, after = {}, {}
    # registered before attach: runs before resprune's hook, so it sees the layer's own output
    handles = [layers[i].register_forward_hook(lambda m, a, out, i=i: before.setdefault(i, out.clone()))
               for i in (0, 1)]
    with pipe.attach(model, proc) as attached, torch.no_grad():
        handles += [layers[i].register_forward_hook(lambda m, a, out, i=i: after.setdefault(i, out.clone()))
                    for i in (0, 1)]
        try:
            model(**inputs)
        finally:
            for h in handles:
                h.remove()
    batch = attached.last
    image = (inputs["input_ids"] == model.config.image_token_id) & inputs["attention_mask"].bool()
    token_of = torch.full(image.shape, -1)
    token_of[image] = torch.arange(int(image.sum()))  # row-major: the order of the planted features
    for layer in (0, 1):
        columns = batch.output_columns if stage_layer is not None and layer >= stage_layer else batch.columns
        expected = torch.zeros_like(after[layer])
        for r in range(columns.shape[0]):
            for c, original in enumerate(columns[r].tolist()):
                if original >= 0 and token_of[r, original] >= 0:
                    expected[r, c] = planted[layer][token_of[r, original]]
        torch.testing.assert_close(after[layer] - before[layer], expected, atol=1e-5, rtol=0)
        placed = int((expected.abs().sum(-1) > 0).sum())
        kept = attached.last.stages[0].selections if stage_layer is not None and layer >= stage_layer \
            else attached.selections
        assert placed == sum(s.k for s in kept) < int(image.sum())


# --- InternVL3: crops and a thumbnail, each tile its share ---------------------------------------


@pytest.mark.parametrize("size", [(300, 100), (100, 300), (200, 130), (130, 200), (240, 120), (160, 160), (330, 110)])
def test_internvl_crop_grid_is_the_one_the_processor_cut(size):
    """The crop grid read back from the tiles (the arrangement whose crops, shrunk, match the
    thumbnail) is the one the processor chose from the image size."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    from resprune.backbones.internvl import crop_grid

    model, proc = model_and_processor("internvl")
    ip = proc.image_processor
    for photo in photos()[:2]:
        inputs = tiny_inputs("internvl", proc, [photo.resize(size)], ["What is it?"])
        cols, rows = get_optimal_tiled_canvas((size[1], size[0]), (ip.size["height"], ip.size["width"]),
                                              ip.min_patches, ip.max_patches)
        assert inputs["pixel_values"].shape[0] == rows * cols + (rows * cols > 1)
        if rows * cols > 1:
            assert crop_grid(inputs["pixel_values"]) == (rows, cols)


def test_internvl_budget_per_tile_tiles_positions_and_a_budget_below_the_tiles():
    model, proc = model_and_processor("internvl")
    wide = photos()[0].resize((240, 120))  # 2 crops side by side and the thumbnail: 48 tokens
    inputs = tiny_inputs("internvl", proc, [wide, photos()[2]], PROMPTS)
    with resprune.load_pipeline("resprune-internvl", budget=10).attach(model, proc) as attached, torch.no_grad():
        model(**inputs)
    first, second = attached.selections
    assert (first.n, second.n) == (48, 16)
    tiles = first.geometry.tiles
    assert tiles.tolist() == [1] * 16 + [2] * 16 + [0] * 16  # crops in raster order, the thumbnail last
    assert torch.bincount(tiles[first.kept], minlength=3).tolist() == [4, 3, 3]  # 10 over 3 equal tiles
    assert first.geometry.layout["crop_grid"] == (4, 8)
    pos = first.geometry.positions
    assert pos[16].tolist() == [0.0, pytest.approx(1.75)]  # crop 2's first token, in thumbnail units
    assert pos[32].tolist() == [0.0, 0.0] and pos[47].tolist() == [3.0, 3.0]
    with pytest.raises(resprune.InvalidInputError, match=r"budget of 2 token\(s\).*3 tiles.*scope: global"):
        with resprune.load_pipeline("resprune-internvl", budget=2).attach(model, proc), torch.no_grad():
            model(**inputs)
    with resprune.load_pipeline("resprune-internvl", ["backbone.params.scope=global"], budget=2).attach(
            model, proc) as attached, torch.no_grad():
        model(**inputs)
    assert [s.k for s in attached.selections] == [2, 2]


def test_internvl_cls_attention_is_the_feature_layers_eager_attention_folded_by_the_pixel_shuffle():
    model, proc = model_and_processor("internvl")
    inputs = tiny_inputs("internvl", proc, [photos()[0].resize((240, 120))], ["What is it?"])
    tower = model.model.vision_tower
    impl = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            eager = tower(pixel_values=inputs["pixel_values"], output_attentions=True).attentions[-1]
    finally:
        tower.config._attn_implementation = impl
    row = eager[:, :, 0, 1:].mean(1)  # [tiles, 64]: the CLS query over the patches, mean over heads
    side = int(row.shape[1] ** 0.5)
    folded = model.model.pixel_shuffle(row.reshape(-1, side, side, 1), scale_factor=0.5).sum(-1)  # [tiles, 4, 4]
    with resprune.load_pipeline("resprune-internvl", budget=1.0).attach(model, proc) as attached, torch.no_grad():
        model(**inputs)
    scores = attached.selections[0].scores["cls_attention"]
    torch.testing.assert_close(scores, folded.reshape(-1), atol=1e-6, rtol=1e-5)


def test_internvl_hired_shares_a_global_budget_between_tiles_by_early_cls_attention():
    """HiRED on InternVL3 (scope global): the thumbnail keeps its share, the crops split the rest by
    their layer-0 CLS attention, as on LLaVA-NeXT."""
    model, proc = model_and_processor("internvl")
    inputs = tiny_inputs("internvl", proc, [photos()[0].resize((330, 110))], ["What is it?"])
    pipe = resprune.load_pipeline("hired", ["backbone.model_type=internvl",
                                            "backbone.params.scope=global"], budget=20)
    with pipe.attach(model, proc) as attached, torch.no_grad():
        model(**inputs)
    sel = attached.selections[0]
    per_tile = torch.bincount(sel.geometry.tiles[sel.kept], minlength=4)
    assert sel.k == 20 and sel.n == 64 and int(per_tile.sum()) == 20 and (per_tile > 0).all()
