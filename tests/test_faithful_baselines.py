"""Each baseline keeps exactly the tokens its official code keeps.

The references below are transcribed by hand from the official code (read, not copied), as
literally as is useful: the same loops, the same tensor operations, eager attention for the
vision tower's attention maps. The plugins run as users run them: through ``resprune.select``
on random inputs and attached to a tiny model (SDPA) on the bundled photos.
"""

from __future__ import annotations

import math
from importlib import resources

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import resprune
from resprune.strategies.cls_attention import ClsAttention
from resprune.strategies.topk import TopK
from resprune.testing.tiny import tiny_inputs, tiny_lvlm

PROMPTS = ["What is in the picture?", "Describe the colours of the scene in detail, please.", "Where?"]


# --- references, transcribed from the official code ----------------------------------------


def vispruner_reference(features: torch.Tensor, attentions: torch.Tensor, visual_token_num: int,
                        important_ratio: float = 0.5) -> torch.Tensor:
    """Theia-4869/VisPruner @ aefa01a, llava/model/llava_arch.py, ``encode_images``.

    ``features`` (B, N, C) pre-projector patch features, ``attentions`` (B, H, N) CLS->patch
    attention; returns the boolean index mask (B, N).
    """
    b, n, _ = features.shape
    important_token_num = int(visual_token_num * important_ratio)
    diverse_token_num = visual_token_num - important_token_num
    image_attentions = attentions.mean(dim=1)
    token_indices = image_attentions.argsort(dim=-1, descending=True)
    important_indices = token_indices[:, :important_token_num]
    residual_indices = token_indices[:, important_token_num:]
    image_normalized = features / features.norm(dim=-1, keepdim=True)
    while diverse_token_num > 0:
        big_r = residual_indices.shape[1]
        r = min(8, big_r - diverse_token_num)
        if r <= 0:
            break
        residual_tokens = image_normalized[torch.arange(b).unsqueeze(-1).expand(-1, big_r), residual_indices]
        a, bb = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = (a @ bb.transpose(-1, -2)).max(dim=-1).values
        # the official code writes R // 2 - r: R is even and r <= R // 2 in its protocol (576 tokens,
        # budgets <= 192); here R may be odd and a round may ask for more than its even half
        keep_even = max(a.shape[1] - r, 0)
        distinct_indices = scores.argsort(dim=-1, descending=True)[:, r:]
        residual_indices = torch.cat([
            residual_indices[..., ::2][torch.arange(b).unsqueeze(-1).expand(-1, keep_even), distinct_indices],
            residual_indices[..., 1::2],
        ], dim=-1)
    if diverse_token_num > 0:
        selected = torch.cat([important_indices, residual_indices], dim=-1)
    else:
        selected = important_indices
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask.scatter_(1, selected, True)
    return mask


def scope_reference(features: torch.Tensor, cls_attn: torch.Tensor, num_selected_token: int,
                    alpha: float = 1.0) -> torch.Tensor:
    """kinredon/SCOPE @ 6bf7306, scope/clip_encoder.py, ``SCOPE`` (``COMBINED=multi``).

    ``features`` (B, N, C), ``cls_attn`` (B, N) CLS attention summed over heads; returns the
    picks (B, K) in selection order.
    """
    norm_vectors = features / features.norm(dim=-1, keepdim=True)
    cosine_simi = torch.bmm(norm_vectors, norm_vectors.transpose(1, 2))
    b, n = features.shape[:2]
    selected = torch.zeros(b, n, dtype=torch.bool)
    selected_idx = torch.empty(b, num_selected_token, dtype=torch.long)
    cur_max = torch.zeros(b, n)
    powered = cls_attn ** alpha
    for i in range(num_selected_token):
        unselected = ~selected
        gains = torch.maximum(torch.zeros(1),
                              cosine_simi.masked_fill(~unselected.unsqueeze(1), 0) - cur_max.unsqueeze(2)).sum(dim=1)
        gains = gains * powered
        gains = gains.masked_fill(~unselected, float("-inf"))
        best = gains.argmax(dim=1)
        selected[torch.arange(b), best] = True
        selected_idx[:, i] = best
        cur_max = torch.maximum(cur_max, cosine_simi[torch.arange(b), best])
    return selected_idx


# --- random inputs ---------------------------------------------------------------------------


def _inputs(seed: int, b: int, n: int, c: int, heads: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, n, c, generator=gen)
    attn = torch.softmax(torch.randn(b, heads, n, generator=gen) * 2, dim=-1)  # per head
    tokens = torch.randn(b, n, 2 * c, generator=gen)  # projector outputs: not what either method reads
    return tokens, feats, attn


def _kept(tokens, k, selector, feats, attn, **params):
    return resprune.select(tokens, k, selector=selector, scores={"cls_attention": attn.mean(dim=1)},
                           context={"vision_features": feats}, **params)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 3), n=st.integers(8, 80), k_frac=st.floats(0.02, 1.0),
       ratio=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]))
def test_vispruner_keeps_the_official_set(seed, b, n, k_frac, ratio):
    tokens, feats, attn = _inputs(seed, b, n, 16)
    k = max(1, round(k_frac * n))
    ours = _kept(tokens, k, "vispruner", feats, attn, important_ratio=ratio)
    ref = vispruner_reference(feats, attn, k, ratio)
    for i in range(b):
        assert set(ours[i].tolist()) == set(ref[i].nonzero().squeeze(1).tolist())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 3), n=st.integers(4, 80), k_frac=st.floats(0.02, 1.0),
       alpha=st.sampled_from([0.0, 0.5, 1.0, 2.0]))
def test_scope_keeps_the_official_picks_in_order(seed, b, n, k_frac, alpha):
    tokens, feats, attn = _inputs(seed, b, n, 16)
    k = max(1, round(k_frac * n))
    heads = attn.shape[1]
    ours = resprune.select(tokens, k, selector="scope", order="selection", alpha=alpha,
                           scores={"cls_attention": attn.sum(dim=1)}, context={"vision_features": feats})
    ref = scope_reference(feats, attn.sum(dim=1), k, alpha)
    assert torch.equal(ours, ref)
    # the mean over heads (resprune's cls_attention) only rescales the saliency: the same set
    mean = _kept(tokens, k, "scope", feats, attn, alpha=alpha)
    assert torch.equal(mean, ours.sort(dim=-1).values), f"heads={heads}"


def test_vispruner_drops_at_most_step_per_round_and_keeps_the_important_ones():
    tokens, feats, attn = _inputs(0, 1, 64, 8)
    keep = _kept(tokens, 16, "vispruner", feats, attn, important_ratio=0.5)[0].tolist()
    top8 = attn.mean(dim=1)[0].argsort(descending=True)[:8].tolist()
    assert set(top8) <= set(keep)


def test_similarity_on_the_stage_tokens_needs_no_vision_features():
    tokens, _, attn = _inputs(1, 2, 30, 8)
    for name in ("vispruner", "scope"):
        keep = resprune.select(tokens, 10, selector=name, features="tokens",
                               scores={"cls_attention": attn.mean(dim=1)})
        assert keep.shape == (2, 10)
        with pytest.raises(resprune.ResPruneError, match="vision_features"):
            resprune.select(tokens, 10, selector=name, scores={"cls_attention": attn.mean(dim=1)})


# --- on a tiny LLaVA-1.5 (SDPA), against the eager tower ---------------------------------------


def _photos() -> list[Image.Image]:
    folder = resources.files("resprune") / "data" / "photos"
    return [Image.open(folder / f"{name}.jpg").convert("RGB") for name in ("astronaut", "chelsea", "coffee")]


def _eager_tower(pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer -2 patch features and its CLS->patch attention (B, H, N) from an eager twin model."""
    twin, _ = tiny_lvlm("llava", attn_implementation="eager")
    with torch.no_grad():
        out = twin.model.vision_tower(pixel_values, output_hidden_states=True, output_attentions=True)
    return out.hidden_states[-2][:, 1:], out.attentions[-2][:, :, 0, 1:]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method", ["vispruner", "scope"])
def test_attached_to_llava_the_kept_set_is_the_official_one(method, batch):
    model, proc = tiny_lvlm("llava")
    assert model.config.vision_config._attn_implementation == "sdpa"
    inputs = tiny_inputs("llava", proc, _photos()[:batch], PROMPTS[:batch])
    assert batch == 1 or bool((inputs["attention_mask"] == 0).any())  # left padding in the batch
    budget = 12
    with resprune.load_pipeline(method, budget=budget).attach(model, proc) as attached, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2)
        kept = [s.kept.tolist() for s in attached.selections]
    assert model.config.vision_config._attn_implementation == "sdpa"  # the plugin left SDPA on
    feats, attn = _eager_tower(inputs["pixel_values"])
    if method == "vispruner":
        ref = [m.nonzero().squeeze(1).tolist() for m in vispruner_reference(feats, attn, budget)]
    else:
        ref = scope_reference(feats, attn.sum(dim=1), budget).sort(dim=-1).values.tolist()
    assert kept == ref


# --- HiRED ------------------------------------------------------------------------------------


def hired_reference(top_attn: torch.Tensor, bottom_attn: torch.Tensor, num_vision_tokens: int,
                    num_total_budget: int, alpha: float) -> torch.Tensor:
    """hasanar1f/HiRED @ 502d6dd, modeling_llava_next.py, ``HiRED_token_selection`` and
    ``HiRED_sub_img_budgets``, for one image.

    ``top_attn`` / ``bottom_attn`` (num_patch, H, S): the CLS rows of layer 0 / the feature layer
    for the base tile then the crops; ``num_total_budget`` is the official
    ``int(num_patch * num_vision_tokens * token_budget_rate)``. Returns the mask (num_patch, N).
    """
    top_layer_attn = top_attn[:, :, -num_vision_tokens:]
    bottom_layer_attn = bottom_attn[:, :, -num_vision_tokens:]
    bottom = bottom_layer_attn.sum(dim=1)
    top = top_layer_attn.sum(dim=1)
    mask = torch.zeros_like(bottom, dtype=torch.bool)
    num_patch = bottom.shape[0]
    full_img_budget = min(int(num_total_budget * alpha), num_vision_tokens)
    total_sub_img_budget = min(num_total_budget - full_img_budget, (num_patch - 1) * num_vision_tokens)
    mask[0, bottom[0].topk(full_img_budget, largest=True).indices] = True
    if total_sub_img_budget > 0:
        spatial_distribution = torch.zeros_like(top[0], dtype=torch.bool)
        spatial_distribution[top[0].topk(int(num_vision_tokens * (1 - alpha)), largest=True).indices] = True
        # reshape(num_patch_height, num_patch_width, -1).sum(-1).reshape(-1): one run of the base
        # image's raster order per crop (the official code needs N divisible by the crops)
        sum_img_mask = spatial_distribution.reshape(num_patch - 1, -1).sum(dim=-1)
        budget_ratio = sum_img_mask / sum_img_mask.sum()
        num_topk_others = torch.clamp((budget_ratio * total_sub_img_budget).int(), max=num_vision_tokens)
        for i, num_topk_other in enumerate(num_topk_others):
            mask[i + 1, bottom[i + 1].topk(int(num_topk_other), largest=True).indices] = True
    return mask


def hired_llava15_reference(bottom_attn: torch.Tensor, num_vision_tokens: int, token_budget_rate: float):
    """hasanar1f/HiRED @ 502d6dd, modeling_llava.py, ``HiRED_token_selection`` (one image;
    ``bottom_attn`` (1, H, S) the CLS row of the feature layer)."""
    attn = bottom_attn[0, :, -num_vision_tokens:].sum(dim=0)
    mask = torch.zeros_like(attn, dtype=torch.bool)
    mask[attn.topk(min(num_vision_tokens, int(num_vision_tokens * token_budget_rate)), largest=True).indices] = True
    return mask


def _tiled(seed: int, crops: int, side: int, heads: int = 3):
    gen = torch.Generator().manual_seed(seed)
    s = side * side
    top = torch.softmax(torch.randn(crops + 1, heads, s + 1, generator=gen) * 2, dim=-1)
    bottom = torch.softmax(torch.randn(crops + 1, heads, s + 1, generator=gen) * 2, dim=-1)
    tiles = torch.arange(crops + 1).repeat_interleave(s)
    early = torch.zeros((crops + 1) * s)
    early[:s] = top[0, :, 1:].mean(0)  # only the base image's early attention is read
    return top, bottom, tiles, bottom[:, :, 1:].mean(1).flatten(), early


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 3), crops=st.sampled_from([1, 2, 3, 4]),
       rate=st.floats(0.02, 1.0), alpha=st.sampled_from([0.25, 0.5, 0.75]))
def test_hired_keeps_the_official_tokens_and_fills_what_flooring_left(seed, b, crops, rate, alpha):
    side, s = 6, 36
    n = (crops + 1) * s
    k = max(1, int(n * rate))
    per_image = [_tiled(seed + i, crops, side) for i in range(b)]
    tiles = per_image[0][2]
    score = torch.stack([p[3] for p in per_image])
    early = torch.stack([p[4] for p in per_image])
    ours = resprune.select(torch.randn(b, n, 8), k, selector="hired", alpha=alpha, context={"tiles": tiles},
                           scores={"cls_attention": score, "cls_attention_early": early})
    for i, (top, bottom, *_rest) in enumerate(per_image):
        ref = set(hired_reference(top, bottom, s, k, alpha).flatten().nonzero().squeeze(1).tolist())
        kept = set(ours[i].tolist())
        assert ref <= kept and len(kept) == k
        rest = score[i].clone()
        rest[list(ref)] = float("-inf")
        assert kept - ref == set(rest.argsort(descending=True)[: k - len(ref)].tolist())


def test_hired_without_crops_is_the_official_llava15_top_k():
    gen = torch.Generator().manual_seed(0)
    bottom = torch.softmax(torch.randn(1, 4, 37, generator=gen), dim=-1)  # the CLS row, 4 heads
    for rate in (0.1, 0.34, 0.9):
        ref = hired_llava15_reference(bottom, 36, rate)
        k = int(36 * rate)
        ours = resprune.select(torch.randn(36, 8), k, selector="hired",
                               scores={"cls_attention": bottom[0, :, 1:].mean(0)})
        assert set(ours.tolist()) == set(ref.nonzero().squeeze(1).tolist())


def test_hired_with_crops_but_no_budget_score_names_it():
    with pytest.raises(resprune.ResPruneError, match="cls_attention_early"):
        resprune.select(torch.randn(72, 8), 10, selector="hired", scores={"cls_attention": torch.rand(72)},
                        context={"tiles": torch.arange(72) // 36})


def _eager_cls_rows(model_type: str, pixel_values: torch.Tensor, **kwargs) -> tuple:
    """CLS rows (tiles, H, S) of every vision layer, from an eager twin of the tiny model."""
    twin, _ = tiny_lvlm(model_type, attn_implementation="eager", **kwargs)
    with torch.no_grad():
        out = twin.model.vision_tower(pixel_values, output_attentions=True)
    return tuple(a[:, :, 0] for a in out.attentions)


def _tiles_of(model, inputs) -> torch.Tensor:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    counts = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
              for s in inputs["image_sizes"]]
    return torch.cat([p[:c] for p, c in zip(inputs["pixel_values"], counts)]), counts


@pytest.mark.parametrize("model_type", ["llava", "llava_next"])
def test_cls_attention_layers_are_the_eager_attention_of_every_layer(model_type):
    model, proc = tiny_lvlm(model_type)
    inputs = tiny_inputs(model_type, proc, _photos()[:2], PROMPTS[:2])
    pipe = resprune.Pipeline(TopK(score="early"), budget=3,
                             scorers=[("early", ClsAttention(layer=0)), ("late", ClsAttention(layer=-1))])
    with pipe.attach(model, proc) as attached, torch.no_grad():
        model(**inputs)
    pixels = inputs["pixel_values"] if model_type == "llava" else _tiles_of(model, inputs)[0]
    rows = _eager_cls_rows(model_type, pixels)
    first = 0
    for sel in attached.selections:
        for name, layer in (("early", 0), ("late", -1)):
            eager = rows[layer].mean(1)[:, 1:]  # [tiles, patches]
            if model_type == "llava":
                torch.testing.assert_close(sel.scores[name], eager[sel.image], rtol=1e-5, atol=1e-6)
            else:  # the base tile's tokens
                base = sel.geometry.layout["tile"] == 0
                got = sel.scores[name][base & ~sel.geometry.layout["newline"]]
                torch.testing.assert_close(got, eager[first], rtol=1e-5, atol=1e-6)
        first += 0 if model_type == "llava" else int(sel.geometry.layout["tile"].max()) + 1


@pytest.mark.parametrize("batch", [1, 3])
def test_hired_attached_to_llava_next_keeps_the_official_survivors(batch):
    model, proc = tiny_lvlm("llava_next", image_size=56)  # a 4 x 4 base tile: 16 tokens, 4 runs of 4
    inputs = tiny_inputs("llava_next", proc, _photos()[:batch], PROMPTS[:batch])
    with resprune.load_pipeline("hired-llava-next").attach(model, proc) as attached, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2)
        selections = list(attached.selections)
    assert model.config.vision_config._attn_implementation == "sdpa"
    pixels, counts = _tiles_of(model, inputs)
    rows = _eager_cls_rows("llava_next", pixels, image_size=56)
    top, bottom = rows[0], rows[model.config.vision_feature_layer]
    start = 0
    for sel, tiles in zip(selections, counts):
        layout = sel.geometry.layout
        official = hired_reference(top[start:start + tiles], bottom[start:start + tiles], 16, sel.k, 0.5)
        start += tiles
        tile, cell = layout["tile"], layout["tile_cell"]
        alive = ~layout["newline"]
        survivors = {j for j in range(sel.n) if alive[j] and official[tile[j], cell[j]]}  # after unpadding
        kept = set(sel.kept.tolist())
        assert survivors <= kept and len(kept) == sel.k and not (kept & set(layout["newline"].nonzero()[:, 0].tolist()))
        if sel.image == 0:  # the square photo: nothing unpadded; the official picks are all there
            assert len(survivors) == int(official.sum()) > sel.k // 2
        else:  # unpadding removed some of the crops' tokens
            assert tile.numel() - int((~alive).sum()) < tiles * 16


# --- DivPrune ---------------------------------------------------------------------------------


def divprune_reference(visual_feature_vectors: torch.Tensor, threshold_terms: int) -> torch.Tensor:
    """vbdi/divprune @ 799e2d9, LLaVA/llava/model/llava_arch.py, ``DivPrune`` (the official code
    takes ``threshold_terms = int(round(ratio * N))``; here the count itself). Picks in order."""
    norm_matrix = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(norm_matrix, norm_matrix.t())
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):
        if i == 0:
            m2 = cosine_matrix
        else:
            m2 = torch.index_select(cosine_matrix, 0, torch.index_select(s, 0, torch.arange(0, i)))
        if i == 0:
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(m2, dim=0).values
        s[i] = torch.argmax(scores)
    return s


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 90), d=st.sampled_from([4, 16, 64]), k_frac=st.floats(0.01, 1.0))
def test_divprune_picks_what_the_official_code_picks_in_its_order(seed, n, d, k_frac):
    v = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    k = max(1, round(k_frac * n))
    ours = resprune.select(v, k, selector="divprune", order="selection").tolist()
    ref = divprune_reference(v, k).tolist()
    if ours != ref:  # only where two candidates tie to float precision (an ulp of the normalisation)
        t = next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)
        unit = v / v.norm(dim=1, keepdim=True)
        dist = 1.0 - unit @ unit.T
        key = dist[ref[:t]].min(0).values if t else torch.topk(dist, 2, dim=0, largest=False).values[1]
        assert abs(float(key[ours[t]] - key[ref[t]])) <= 1e-6, f"DivPrune parts from the official order at pick {t}"


# --- DART ---------------------------------------------------------------------------------------


def dart_reference(last_layer_state: torch.Tensor, any_states: torch.Tensor, image_token_start_index: int,
                   image_token_length: int, max_num_trunction: int, pivot_image_token: int = 4,
                   pivot_text_token: int = 4) -> list[int]:
    """DART (upstream 5a19452 via xqy1111111/DART @ d6a5af6), modeling_llama_self.py,
    ``get_retained_image_token``: ``last_layer_state`` (1, L, D) the final-normed output of layer
    K-1, ``any_states`` (1, H, L, hd) its keys after RoPE. Absolute positions of the kept image
    tokens, sorted.

    One substitution: the pivots take their turns in a defined order (image pivots by key norm,
    then text pivots) where the official code iterates ``list(set(...))`` of absolute positions,
    an order CPython's hashing decides.
    """
    token_topk = math.ceil(max_num_trunction // (pivot_image_token + pivot_text_token))
    any_states = any_states.permute(0, 2, 1, 3).reshape(any_states.shape[0], any_states.shape[2], -1)
    start, length = image_token_start_index, image_token_length
    k_states_image_token = any_states[0][start:start + length, :]
    k_states_query_token = any_states[0][start + length:, :]
    image_indices = (torch.norm(k_states_image_token, p=1, dim=-1).topk(pivot_image_token).indices + start).tolist()
    query_indices = (torch.norm(k_states_query_token, p=1, dim=-1).topk(pivot_text_token).indices
                     + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(start, start + length)) - set(image_indices)
    valid_indices_list = list(valid_indices)
    for item in image_indices + query_indices:  # the substitution (official: list(indices_set))
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(token_topk).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)


def _dart_inputs_at(model, input_ids, pixel_values, layer: int):
    """Final-normed output of layer ``layer - 1`` and its post-RoPE keys, one unpadded row, eager."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    attn = lm.layers[layer - 1].self_attn
    seen = {}

    def grab(module, args, kwargs):
        seen["h"], seen["pe"] = kwargs["hidden_states"], kwargs["position_embeddings"]

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, pixel_values=pixel_values, output_hidden_states=True)
    finally:
        handle.remove()
    h = seen["h"]
    k = attn.k_proj(h).view(1, h.shape[1], -1, attn.head_dim).transpose(1, 2)
    q = attn.q_proj(h).view(1, h.shape[1], -1, attn.head_dim).transpose(1, 2)
    _, k = apply_rotary_pos_emb(q, k, *seen["pe"])
    return lm.norm(out.hidden_states[layer]), k


@pytest.mark.parametrize("batch", [1, 3])
def test_dart_attached_keeps_the_official_set(batch):
    layer, per_pivot = 2, 2
    model, proc = tiny_lvlm("llava", text_layers=4)
    twin, _ = tiny_lvlm("llava", text_layers=4, attn_implementation="eager")
    weight = torch.rand(model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(1)) * 2
    for m in (model, twin):  # a final norm that is not the identity (a random init leaves it at 1)
        m.model.language_model.norm.weight.data.copy_(weight)
    inputs = tiny_inputs("llava", proc, _photos()[:batch], PROMPTS[:batch])
    budget = 4 + 8 * per_pivot  # DART's "max_num_trunction = 8 * per_pivot" keeps the 4 pivots more
    with resprune.load_pipeline("dart", budget=budget).attach(model, proc) as attached, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2)
        kept = [s.kept.tolist() for s in attached.last.stages[0].selections]
    image = model.config.image_token_id
    for row in range(batch):
        ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()][None]
        start = int((ids[0] == image).nonzero()[0])
        state, keys = _dart_inputs_at(twin, ids, inputs["pixel_values"][row:row + 1], layer)
        ref = dart_reference(state, keys, start, 36, 8 * per_pivot)
        assert kept[row] == [p - start for p in ref]


# --- PyramidDrop ------------------------------------------------------------------------------


def pdrop_reference(model, input_ids, pixel_values, layer_list=(8, 16, 24), ratios=(1.0, 0.5, 0.25, 0.125),
                    prompt_len=None, forced=None):
    """Cooperx521/PyramidDrop @ 6444f30, llava/model/modeling_llama_pdrop.py, ``pdrop_forward`` and
    ``pdrop_rank_drop`` at inference, one unpadded row, on ``model``'s eager layers.

    After layer ``K - 1`` (K in ``layer_list``) layer K's own query and key projections of its input
    give the last instruction token's attention; the top ``int(N * ratios[s + 1])`` image tokens
    stay and the positions are numbered 0, 1, ... again. The official code multiplies queries by
    keys without repeating grouped keys (Vicuna has no GQA); here they are repeated. Returns the kept
    image tokens after each stage (indices into the image) and the last column's logits.
    ``prompt_len``: the prompt's length when ``input_ids`` also holds generated tokens (the query
    is the last prompt token); ``forced``: kept sets to apply instead of ranking (decoding).
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    lm = model.model.language_model
    ids = input_ids[0]
    image = (ids == model.config.image_token_id).nonzero()[:, 0]
    image_index, n_image = int(image[0]), image.numel()
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output[0]
        features = lm.embed_tokens(ids)[None].clone()
        features[0, image] = feats
        position_ids = torch.arange(features.shape[1])[None]
        kept, image_tokens = [], n_image
        last_prompt = (prompt_len or ids.numel()) - 1
        for layer_idx, layer in enumerate(lm.layers):
            length = features.shape[1]
            causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
            features = layer(features, attention_mask=causal, position_ids=position_ids,
                             position_embeddings=lm.rotary_emb(features, position_ids))
            rank_layer = layer_idx + 1
            if rank_layer not in layer_list:
                continue
            stage = layer_list.index(rank_layer)
            keep_length = int(n_image * ratios[stage + 1])
            if forced is None:
                attn = lm.layers[rank_layer].self_attn
                hidden = lm.layers[rank_layer].input_layernorm(features)
                q = attn.q_proj(hidden).view(1, length, -1, attn.head_dim).transpose(1, 2)
                k = attn.k_proj(hidden).view(1, length, -1, attn.head_dim).transpose(1, 2)
                cos, sin = lm.rotary_emb(hidden, position_ids)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                k = repeat_kv(k, q.shape[1] // k.shape[1])
                text_query_states = q[0][:, last_prompt, :].unsqueeze(1)
                weights = torch.matmul(text_query_states, k[0].transpose(1, 2)) / math.sqrt(attn.head_dim)
                weights = weights + causal[0][:, last_prompt, :].unsqueeze(1)
                weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32)
                avg = torch.mean(weights, dim=0)[:, image_index:image_index + image_tokens]
                top = torch.mean(avg, dim=0).topk(keep_length).indices.sort().values
                kept.append(top if not kept else kept[-1][top])
            else:
                kept.append(forced[stage])
                prev = forced[stage - 1] if stage else torch.arange(n_image)
                top = torch.searchsorted(prev, forced[stage])
            top = top + image_index
            start = image_index + image_tokens
            features = torch.cat([features[:, :image_index], features[:, top], features[:, start:]], dim=1)
            last_prompt -= image_tokens - keep_length
            image_tokens = keep_length
            position_ids = torch.arange(features.shape[1])[None]
        logits = model.lm_head(lm.norm(features))[0, -1]
    return kept, logits


@pytest.mark.parametrize("batch", [1, 3])
def test_pdrop_keeps_the_official_tokens_and_positions(batch):
    # 8 x 8 = 64 image tokens: 32, 16, 8 after the stages (PDrop floors int(N * 0.5 ** s); resprune
    # rounds half the entering count half up, the same numbers while the counts stay even, as 576's do)
    model, proc = tiny_lvlm("llava", text_layers=25, image_size=112)
    twin, _ = tiny_lvlm("llava", text_layers=25, image_size=112, attn_implementation="eager")
    inputs = tiny_inputs("llava", proc, _photos()[:batch], PROMPTS[:batch])
    with resprune.load_pipeline("pdrop").attach(model, proc) as attached, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, output_logits=True, return_dict_in_generate=True)
        stages = attached.last.stages
    assert [st.layer for st in stages] == [8, 16, 24]
    for row in range(batch):
        real = inputs["attention_mask"][row].bool()
        ids = inputs["input_ids"][row][real][None]
        kept, logits = pdrop_reference(twin, ids, inputs["pixel_values"][row:row + 1])
        assert [st.selections[row].kept.tolist() for st in stages] == [k.tolist() for k in kept]
        torch.testing.assert_close(out.logits[0][row], logits, rtol=1e-4, atol=1e-4)
        for step in (1, 2):  # decoding: the new tokens' positions follow the re-indexed prompt
            grown = torch.cat([ids, out.sequences[row:row + 1, inputs["input_ids"].shape[1]:][:, :step]], dim=1)
            _, logits = pdrop_reference(twin, grown, inputs["pixel_values"][row:row + 1], prompt_len=ids.shape[1],
                                        forced=kept)
            torch.testing.assert_close(out.logits[step][row], logits, rtol=1e-4, atol=1e-4)


def test_own_layer_attention_is_the_eager_attention_of_layer_k():
    model, proc = tiny_lvlm("llava", text_layers=4)
    twin, _ = tiny_lvlm("llava", text_layers=4, attn_implementation="eager")
    inputs = tiny_inputs("llava", proc, _photos()[:2], PROMPTS[:2])
    stage = resprune.Stage("topk", budget=1.0, layer=2, scorers=[resprune.strategies.llm_scores.LLMAttention(
        layer="current")])
    stage.selector = resprune.selection.make_selector("topk", {"score": "llm_attention"})
    with resprune.Pipeline(None, budget=1.0, stages=[stage]).attach(model, proc) as attached, torch.no_grad():
        model.generate(**inputs, max_new_tokens=1)
        got = [s.scores["llm_attention"] for s in attached.last.stages[0].selections]
        position_ids = (inputs["attention_mask"].cumsum(1) - 1).clamp_min(0)
        eager = twin(**inputs, position_ids=position_ids, output_attentions=True).attentions[2]  # [B, H, L, L]
    image = inputs["input_ids"] == model.config.image_token_id
    for row, scores in enumerate(got):
        torch.testing.assert_close(scores, eager[row].mean(0)[-1][image[row]], rtol=1e-5, atol=1e-6)


# --- VisionZip --------------------------------------------------------------------------------


def visionzip_reference(attn_weights: torch.Tensor, hidden_states: torch.Tensor, metric: torch.Tensor,
                        dominant_num: int, contextual_num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dvlab-research/VisionZip @ 3151f6d, visionzip/clip_encoder.py, ``CLIPVisionTower_VisionZip.forward``
    (``dominant_num`` = ``dominant - 1`` as ``apply_info`` sets it). ``attn_weights`` (B, H, S, S) and
    ``hidden_states`` (B, S, C) of layer -2, ``metric`` (B, S, hd) its keys averaged over heads.
    Returns the tokens handed to the projector (B, dominant + contextual, C) and ``all_indices``."""
    cls_idx = 0
    cls_attention = attn_weights[:, :, cls_idx, cls_idx + 1:]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(
        hidden_states.shape[0], dominant_num + 1, hidden_states.shape[2])
    metric_filtered = metric[mask].view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1),
                                        metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(
        hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), hidden_states.shape[2])
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    keep = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, keep, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num,
                                 dtype=hidden_states_filtered.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, keep, :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    return torch.cat([dominant_tokens, contextual_tokens], dim=1), all_indices


@pytest.mark.parametrize("batch", [1, 3])
def test_visionzip_feeds_the_llm_the_official_tokens_in_order(batch):
    model, proc = tiny_lvlm("llava")
    twin, _ = tiny_lvlm("llava", attn_implementation="eager")
    inputs = tiny_inputs("llava", proc, _photos()[:batch], PROMPTS[:batch])
    budget, contextual = 12, 2  # round(0.15625 * 12) = 2 contextual, 1 CLS, 9 dominant patches
    with resprune.load_pipeline("visionzip", budget=budget).attach(model, proc) as attached, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2)
        batch_in = attached.last
    vt = twin.model.vision_tower
    tower = getattr(vt, "vision_model", vt).encoder.layers[-2].self_attn
    seen = {}
    handle = tower.k_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("k", out))
    with torch.no_grad():
        out = twin.model.vision_tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
        handle.remove()
        b, s, _ = seen["k"].shape
        metric = seen["k"].view(b, s, tower.num_heads, tower.head_dim).mean(2)
        tokens, all_indices = visionzip_reference(out.attentions[-2], out.hidden_states[-2], metric,
                                                  budget - contextual - 1, contextual)
        expected = twin.model.multi_modal_projector(tokens)
    image = batch_in.input_ids == model.config.image_token_id
    for row in range(batch):
        got = batch_in.inputs_embeds[row][image[row]]
        torch.testing.assert_close(got, expected[row], rtol=1e-5, atol=1e-5)
        dominant = set((all_indices[row, 1:] - 1).tolist())
        assert dominant <= set(attached.selections[row].kept.tolist())


# --- bad input names what was wrong --------------------------------------------------------------


def test_visionzip_merger_on_a_tower_without_cls_is_refused_by_name():
    model, proc = tiny_lvlm("qwen2_5_vl")
    pipe = resprune.Pipeline("divprune", budget=8, merger="visionzip")
    with pytest.raises(resprune.ResPruneError, match="merger 'visionzip'.*(projector|vision_)"):
        pipe.attach(model, proc)


def test_cls_attention_layer_past_the_tower_is_named():
    model, proc = tiny_lvlm("llava")
    inputs = tiny_inputs("llava", proc, _photos()[:1], PROMPTS[:1])
    pipe = resprune.Pipeline(TopK(score="early"), budget=4, scorers=[("early", ClsAttention(layer=5))])
    with pytest.raises(resprune.ResPruneError, match="layer=5 is outside the vision tower's 2 encoder layers"):
        with pipe.attach(model, proc), torch.no_grad():
            model(**inputs)


def test_positions_reindex_on_an_mrope_model_is_refused_by_name():
    model, proc = tiny_lvlm("qwen2_5_vl", text_layers=3)
    stage = resprune.Stage("topk", budget=0.5, layer=1, scorers=["llm_attention"], positions="reindex")
    stage.selector = resprune.selection.make_selector("topk", {"score": "llm_attention"})
    with pytest.raises(resprune.ResPruneError, match="M-RoPE"):
        resprune.Pipeline(None, budget=0.5, stages=[stage]).attach(model, proc)
    with pytest.raises(resprune.ResPruneError, match="positions"):
        resprune.Stage("topk", budget=0.5, positions="reindex")  # the input stage has no positions to renumber


# --- SparseVLM --------------------------------------------------------------------------------


def sparsevlm_cluster_and_merge(x, cluster_num):
    """Gumpest/SparseVLMs @ 535f8ba, llava/model/language_model/utils.py, ``cluster_and_merge``.
    The official code adds uniform noise of 1e-6 to the densities to break ties, which are common
    (mutual nearest neighbours have equal densities when ``cluster_num`` is 2), so its clusters are
    random there; here, as in resprune, a tie goes to the lower index."""
    b, n, c = x.shape
    x1 = x[:, :, None, :]
    x2 = x[:, None, :, :]
    dist_matrix = (x1 - x2).norm(dim=-1, p=2) / (c ** 0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    index = torch.arange(n)
    tie = (density[:, None, :] == density[:, :, None]) & (index[None, None, :] < index[None, :, None])
    mask = ((density[:, None, :] > density[:, :, None]) | tie).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    picked = dist_matrix[torch.arange(b)[:, None], index_down]  # index_points
    idx_cluster = picked.argmin(dim=1)
    idx_batch = torch.arange(b)[:, None].expand(b, cluster_num)
    idx_tmp = torch.arange(cluster_num)[None, :].expand(b, cluster_num)
    idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)
    token_weight = x.new_ones(b, n, 1)
    idx = idx_cluster + torch.arange(b)[:, None] * cluster_num
    all_weight = token_weight.new_zeros(b * cluster_num, 1)
    all_weight.index_add_(dim=0, index=idx.reshape(b * n), source=token_weight.reshape(b * n, 1))
    all_weight = all_weight + 1e-6
    norm_weight = token_weight / all_weight[idx]
    x_merged = x.new_zeros(b * cluster_num, c)
    x_merged.index_add_(dim=0, index=idx.reshape(b * n), source=(x * norm_weight).reshape(b * n, c))
    return x_merged.reshape(b, cluster_num, c), index_down


def sparsevlm_reference(model, input_ids, pixel_values, counts=(300, 200, 110), pruning_loc=(2, 6, 15)):
    """Gumpest/SparseVLMs @ 535f8ba, ``modelling_sparse_llama.py`` (``LlamaDynamicvitModel.forward``)
    with ``score.py`` ``attn_postprocess_topk``, at inference, one unpadded row, on ``model``'s eager
    layers. Raters: text tokens (everything after the image) whose ``softmax_t(V T^T)`` averaged over
    the visual tokens is above its mean, on the input embeddings. After layer ``l`` in
    ``pruning_loc``: layer ``l``'s attention (softmax, mean over heads) from the raters to the visual
    tokens, averaged over the raters; the top ``min(count, v - 1)`` stay; the ``int(0.3 d) + 1`` best
    of the ``d`` dropped are clustered into ``int(m / 10) + 1`` tokens put after the kept ones;
    positions 0, 1, ... again. Returns the picks of each stage (ids: an image token's index, a merged
    token's id is its cluster centre's) and the last column's logits."""
    lm = model.model.language_model
    ids = input_ids[0]
    image = (ids == model.config.image_token_id).nonzero()[:, 0]
    v_token_start, v_token_num = int(image[0]), image.numel()
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output[0]
        hidden = lm.embed_tokens(ids)[None].clone()
        hidden[0, image] = feats
        text_token_start = v_token_start + v_token_num
        v_t = hidden[:, v_token_start:text_token_start, :]
        t_t = hidden[:, text_token_start:, :]
        m_v_t = (v_t @ t_t.transpose(1, 2)).softmax(2).mean(1)
        t_token_idx = torch.where(m_v_t > m_v_t.mean())
        token_ids = torch.arange(v_token_num)  # the id of each current visual token
        position_ids = torch.arange(hidden.shape[1])[None]
        picks = []
        for layer_idx, layer in enumerate(lm.layers):
            length = hidden.shape[1]
            causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
            position_embeddings = lm.rotary_emb(hidden, position_ids)
            if layer_idx in pruning_loc:
                _, weights = layer.self_attn(layer.input_layernorm(hidden), attention_mask=causal,
                                             position_embeddings=position_embeddings)
            hidden = layer(hidden, attention_mask=causal, position_ids=position_ids,
                           position_embeddings=position_embeddings)
            if layer_idx not in pruning_loc:
                continue
            rows = t_token_idx[1] + text_token_start
            relation_vis_text = weights.mean(1)[:, rows, v_token_start:v_token_start + v_token_num].mean(1)  # [1, v]
            keep = min(counts[pruning_loc.index(layer_idx)], v_token_num - 1)
            indices = torch.topk(relation_vis_text, keep, dim=1).indices[0]
            mask = torch.zeros(v_token_num, dtype=torch.bool)
            mask[indices] = True
            picks.append(sorted(token_ids[mask].tolist()))
            visual = hidden[:, v_token_start:v_token_start + v_token_num]
            dropped = torch.where(~mask)[0]
            merge_num = int(dropped.shape[0] * 0.3) + 1
            stage2_idx = relation_vis_text[0][dropped].topk(merge_num)[1]
            stage2 = visual[:, dropped[stage2_idx]]
            cluster_num = int(stage2.shape[1] / 10) + 1
            merged, centres = sparsevlm_cluster_and_merge(stage2, cluster_num)
            hidden = torch.cat([hidden[:, :v_token_start], visual[:, mask], merged, hidden[:, text_token_start:]], dim=1)
            token_ids = torch.cat([token_ids[mask], token_ids[dropped[stage2_idx][centres[0]]]])
            v_token_num = int(mask.sum()) + cluster_num
            text_token_start = v_token_start + v_token_num
            position_ids = torch.arange(hidden.shape[1])[None]
        logits = model.lm_head(lm.norm(hidden))[0, -1]
    return picks, logits


@pytest.mark.parametrize("batch", [1, 3])
def test_sparsevlm_keeps_the_official_tokens_recycles_them_and_gives_its_logits(batch):
    model, proc = tiny_lvlm("llava", text_layers=17, image_size=336)  # 576 image tokens: the official counts
    twin, _ = tiny_lvlm("llava", text_layers=17, image_size=336, attn_implementation="eager")
    inputs = tiny_inputs("llava", proc, _photos()[:batch], PROMPTS[:batch])
    with resprune.load_pipeline("sparsevlm").attach(model, proc) as attached, torch.no_grad():
        out = model(**inputs)
        stages = attached.last.stages
    assert [st.layer for st in stages] == [3, 7, 16]
    for row in range(batch):
        real = inputs["attention_mask"][row].bool()
        ids = inputs["input_ids"][row][real][None]
        picks, logits = sparsevlm_reference(twin, ids, inputs["pixel_values"][row:row + 1])
        for st, want in zip(stages, picks):
            sel = st.selections[row]
            assert sorted(sel.order[:len(want)].tolist()) == want  # the picks come first in the order
        # 300 + 9 recycled (276 dropped: 83 recycled into 9), 200 + 4, 110 + 3
        assert [st.selections[row].k for st in stages] == [309, 204, 113]
        torch.testing.assert_close(out.logits[row, -1], logits, rtol=1e-4, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 3), m=st.integers(1, 60), c=st.integers(2, 24))
def test_sparsevlm_clustering_is_the_official_one(seed, b, m, c):
    from resprune.strategies.sparsevlm import density_peak_merge

    torch.manual_seed(seed)
    x = torch.randn(b, m, c)
    clusters = int(m / 10) + 1
    merged, centres = density_peak_merge(x, clusters)
    want, want_centres = sparsevlm_cluster_and_merge(x, clusters)
    if clusters == 1:  # the nearest neighbour is the token itself: every density is 1, a tie the official
        # code breaks by its random noise; one cluster is the mean of all, whichever token is its centre
        torch.testing.assert_close(merged, x.mean(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
        return
    assert torch.equal(centres, want_centres)
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-6)


def test_recycled_tokens_come_on_top_of_the_budget_and_follow_the_kept_ones():
    torch.manual_seed(0)
    tokens, score = torch.randn(2, 40, 8), torch.rand(2, 40)
    stage = resprune.Stage(resprune.selection.make_selector("topk", {"score": "s"}), budget=10,
                           merger=resprune.selection.make_merger("recycle", {"score": "s"}))
    sel = stage.run(resprune.PruneContext(tokens), scores={"s": score})
    # 30 dropped: int(0.3 * 30) + 1 = 10 recycled into int(10 / 10) + 1 = 2 tokens
    assert sel.k == 12 and sel.kept.shape == (2, 12) and sel.features.shape == (2, 12, 8)
    picks = score.topk(10, dim=1).indices.sort(dim=1).values
    for row in range(2):
        assert sel.held[row, :10].tolist() == picks[row].tolist()  # the kept tokens first, in order ...
        torch.testing.assert_close(sel.features[row, :10], tokens[row, picks[row]])
        assert set(sel.kept[row].tolist()) == set(sel.held[row].tolist())  # ... then the merged ones
        assert sel.kept[row].tolist() == sorted(sel.kept[row].tolist())


# --- CDPruner and TRIM (a CLIP text tower beside the model) ------------------------------------


def cdpruner_reference(image_features: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                       visual_token_num: int) -> torch.Tensor:
    """Theia-4869/CDPruner @ 9541616, llava/model/llava_arch.py, ``encode_images``: projector outputs
    ``image_features`` (B, N, D), CLIP-projected patches ``image_embeds`` (B, N, C), the question's
    chunks ``text_embeds`` (M, C). Returns the picks (B, T) in the order the loop makes them."""
    B, N, _ = image_features.shape
    image_normalized = (image_features / image_features.norm(dim=-1, keepdim=True)).float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = torch.matmul(image_embeds, text_embeds.t())
    relevance = (-relevance).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((visual_token_num, B, N))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum('tb,tbn->bn', cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float('inf')
    return select_idx.t()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(4, 70), d=st.integers(80, 120), m=st.integers(1, 3),
       k_frac=st.floats(0.05, 1.0))
def test_cdpruner_picks_what_the_official_code_picks_in_its_order(seed, n, d, m, k_frac):
    torch.manual_seed(seed)
    features, patches, text = torch.randn(1, n, d), torch.randn(1, n, 16), torch.randn(m, 16)
    k = max(1, int(k_frac * n))
    want = cdpruner_reference(features, patches, text, k)
    relevance = -(torch.nn.functional.normalize(patches, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T)
    got = resprune.select(features, k, selector="cdpruner", order="selection",
                          scores={"clip_relevance": relevance.mean(dim=-1)})
    assert got.tolist() == want.tolist()


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    from resprune.clip_text import tiny_clip

    return str(tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip"))


def _clip_side(twin, pixel_values, clip_path):
    """Layer -2 patch features, their CLIP projection (post-norm, visual projection) and the projector
    outputs, from an eager twin of the tiny LLaVA-1.5."""
    from resprune.clip_text import load_clip_text

    clip = load_clip_text(clip_path)
    with torch.no_grad():
        out = twin.model.vision_tower(pixel_values, output_hidden_states=True)
        features = out.hidden_states[-2][:, 1:]
        embeds = clip.visual_projection(twin.model.vision_tower.post_layernorm(features).float())
        projected = twin.model.multi_modal_projector(features)
    return features, embeds, projected, clip


@pytest.mark.parametrize("batch", [1, 3])
def test_cdpruner_attached_keeps_the_official_set(batch, clip_path):
    from resprune.text import strip_format

    model, proc = tiny_lvlm("llava")
    twin, _ = tiny_lvlm("llava", attn_implementation="eager")
    inputs = tiny_inputs("llava", proc, _photos()[:batch], PROMPTS[:batch])
    pipe = resprune.load_pipeline("cdpruner", {"scorers.0.params.clip_model": clip_path}, budget=11)
    with pipe.attach(model, proc) as attached, torch.no_grad():
        attached.prune(inputs)
    _, embeds, projected, clip = _clip_side(twin, inputs["pixel_values"], clip_path)
    for i, sel in enumerate(attached.selections):
        text = clip.embed_chunks(strip_format(sel.text))
        want = cdpruner_reference(projected[i:i + 1], embeds[i:i + 1], text, 11)  # the official batch is one image
        assert sel.kept.tolist() == sorted(want[0].tolist())
        assert sel.order.tolist() == want[0].tolist()


@pytest.mark.parametrize("batch, adaptive", [(1, False), (3, False), (1, True)])
def test_trim_feeds_the_llm_the_official_tokens_and_the_mean_of_the_rest(batch, adaptive, clip_path):
    from resprune.text import strip_format

    model, proc = tiny_lvlm("llava")
    twin, _ = tiny_lvlm("llava", attn_implementation="eager")
    inputs = tiny_inputs("llava", proc, _photos()[:batch], PROMPTS[:batch])
    keep = 9
    pipe = resprune.load_pipeline("trim-adaptive" if adaptive else "trim",
                                  {"scorers.0.params.clip_model": clip_path}, **({} if adaptive else {"budget": keep}))
    with pipe.attach(model, proc) as attached, torch.no_grad():
        pruned = attached.prune(inputs)
    features, embeds, _, clip = _clip_side(twin, inputs["pixel_values"], clip_path)
    # FreedomIntelligence/TRIM clip_encoder.py @ 0e66677, token_reduction ('TextSim+:k'): the texts
    # of the batch embedded together, the raw dot product negated and soft-maxed over the tokens
    text_features = clip.embed_truncated([strip_format(sel.text) for sel in attached.selections])
    similarities = torch.matmul(embeds, text_features.unsqueeze(2)).squeeze(2)
    similarities = torch.nn.functional.softmax(-similarities, dim=-1)
    if adaptive:  # 'TextSim+:-1': the IQR outliers (one image: the official batch in its evaluation)
        keep = int(36 * outlier_dectection(similarities))
    _, topk_indices = torch.topk(similarities, keep, dim=1, largest=True, sorted=False)
    token_mask = torch.zeros(batch, 36, dtype=torch.bool)
    token_mask[torch.arange(batch).unsqueeze(1), topk_indices] = True
    selected = features[token_mask].view(batch, keep, -1)
    remaining = torch.logical_not(token_mask)
    remaining_mean = (features * remaining.unsqueeze(-1)).sum(dim=1) / remaining.sum(dim=1, keepdim=True)
    with torch.no_grad():
        want = twin.model.multi_modal_projector(torch.cat([selected, remaining_mean[:, None]], dim=1))
    slots = (pruned.input_ids == model.config.image_token_id) & pruned.attention_mask.bool()
    got = pruned.inputs_embeds[slots].view(batch, keep + 1, -1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for i, sel in enumerate(attached.selections):
        assert set(topk_indices[i].tolist()) <= set(sel.kept.tolist()) and sel.k == keep + 1


# --- PruMerge ---------------------------------------------------------------------------------


def outlier_dectection(attn):
    """PruMerge's (and TRIM's) IQR outlier ratio, as their code computes it."""
    import numpy as np

    attn_np = attn.to(dtype=torch.float32).cpu().numpy().flatten()
    Q1 = np.percentile(attn_np, 25)
    Q3 = np.percentile(attn_np, 75)
    IQR = Q3 - Q1
    upper_bound = Q3 + 1.5 * IQR
    outlier_indices = np.where((attn_np > upper_bound))[0]
    return len(outlier_indices) / len(attn_np)


def prumerge_reference(vision_tower, images, reduction_ratio, if_adaptive=False):
    """42Shawn/LLaVA-PruMerge @ 097c041, llava/model/multimodal_encoder/clip_encoder.py,
    ``token_prune_merge_advanced(images, if_adaptive, reduction_ratio)``: the features handed to the
    projector, (B, left_tokens + 1, C), and the kept indices in the official order."""
    import torch.nn.functional as F

    outputs = {}
    hook_handle_k = vision_tower.encoder.layers[23].self_attn.k_proj.register_forward_hook(
        lambda m, i, o: outputs.__setitem__("desired_k", o))
    hook_handle_q = vision_tower.encoder.layers[23].self_attn.q_proj.register_forward_hook(
        lambda m, i, o: outputs.__setitem__("desired_q", o))
    with torch.no_grad():
        image_forward_outs = vision_tower(images, output_hidden_states=True)
    hook_handle_k.remove()
    hook_handle_q.remove()
    image_features = image_forward_outs.hidden_states[-2][:, 1:]
    B, N, C = image_features.shape
    desired_layer_k, desired_layer_q = outputs["desired_k"], outputs["desired_q"]
    attn = (desired_layer_q @ desired_layer_k.transpose(-2, -1)) * C ** -0.5
    attn = F.softmax(attn, dim=-1)
    cls_attn = attn[:, 0, 1:]
    if if_adaptive:
        reduction_ratio = outlier_dectection(cls_attn)
    _, idx = torch.topk(cls_attn, int(N * reduction_ratio), dim=1, largest=True)
    index = idx.unsqueeze(-1).expand(-1, -1, C)
    Key_wo_cls = desired_layer_k[:, 1:]
    x_others = torch.gather(image_features, dim=1, index=index)
    x_others_attn = torch.gather(cls_attn, dim=1, index=idx)
    Key_others = torch.gather(Key_wo_cls, dim=1, index=index)
    mask = torch.ones(B, N, dtype=torch.bool).scatter_(1, idx, False)  # complement_idx: ascending
    compl = torch.stack([torch.nonzero(row)[:, 0] for row in mask])
    non_topk = torch.gather(image_features, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_Key = torch.gather(Key_wo_cls, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_attn = torch.gather(cls_attn, dim=1, index=compl)
    Key_others_norm = F.normalize(Key_others, p=2, dim=-1)
    non_topk_Key_norm = F.normalize(non_topk_Key, p=2, dim=-1)
    B, left_tokens, C = x_others.size()
    updated_x_others = torch.zeros_like(x_others)
    for b in range(B):
        for i in range(left_tokens):
            key_others_norm = Key_others_norm[b, i, :].unsqueeze(0).unsqueeze(0)
            before_i_Key = Key_others_norm[b, :i, :].unsqueeze(0)
            after_i_Key = Key_others_norm[b, i + 1:, :].unsqueeze(0)
            before_i_x_others = x_others[b, :i, :].unsqueeze(0)
            after_i_x_others = x_others[b, i + 1:, :].unsqueeze(0)
            rest_x_others = torch.cat([before_i_x_others, after_i_x_others, non_topk[b, :, :].unsqueeze(0)], dim=1)
            before_i_x_others_attn = x_others_attn[b, :i].unsqueeze(0)
            after_i_x_others_attn = x_others_attn[b, i + 1:].unsqueeze(0)
            rest_x_others_attn = torch.cat([before_i_x_others_attn, after_i_x_others_attn,
                                            non_topk_attn[b, :].unsqueeze(0)], dim=1)
            rest_Keys = torch.cat([before_i_Key, after_i_Key, non_topk_Key_norm[b, :, :].unsqueeze(0)], dim=1)
            cos_sim_matrix = torch.bmm(key_others_norm, rest_Keys.transpose(1, 2))
            _, cluster_indices = torch.topk(cos_sim_matrix, k=int(32), dim=2, largest=True)
            cluster_tokens = rest_x_others[:, cluster_indices.squeeze(), :]
            weights = rest_x_others_attn[:, cluster_indices.squeeze()].unsqueeze(-1)
            weighted_avg = torch.sum(cluster_tokens * weights, dim=1)
            updated_center = weighted_avg + x_others[b, i, :]
            updated_x_others[b, i, :] = updated_center
    extra_one_token = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)
    return torch.cat([updated_x_others, extra_one_token], dim=1), idx


@pytest.mark.parametrize("batch", [1, 3])
def test_prumerge_feeds_the_llm_what_the_official_code_projects(batch):
    model, proc = tiny_lvlm("llava", vision_layers=24)  # the official code reads layer 23 of CLIP-L's 24
    twin, _ = tiny_lvlm("llava", vision_layers=24, attn_implementation="eager")
    inputs = tiny_inputs("llava", proc, _photos()[:batch], PROMPTS[:batch])
    with resprune.load_pipeline("prumerge", budget=9).attach(model, proc) as attached, torch.no_grad():
        pruned = attached.prune(inputs)
    features, idx = prumerge_reference(twin.model.vision_tower, inputs["pixel_values"], 0.25)  # int(36 * 0.25) = 9
    with torch.no_grad():
        want = twin.model.multi_modal_projector(features)
    slots = (pruned.input_ids == model.config.image_token_id) & pruned.attention_mask.bool()
    got = pruned.inputs_embeds[slots].view(batch, 10, -1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for i, sel in enumerate(attached.selections):
        assert set(idx[i].tolist()) <= set(sel.kept.tolist()) and sel.k == 10


def test_prumerge_with_its_adaptive_count_keeps_each_images_outliers():
    # a random tower's attention has few outliers; with this seed and size the photos have 0, 0 and 2
    model, proc = tiny_lvlm("llava", seed=3, vision_layers=24, image_size=112)
    twin, _ = tiny_lvlm("llava", seed=3, vision_layers=24, image_size=112, attn_implementation="eager")
    inputs = tiny_inputs("llava", proc, _photos(), PROMPTS)
    pipe = resprune.load_pipeline("prumerge-adaptive")
    with pipe.attach(model, proc) as attached, torch.no_grad():
        pruned = attached.prune(inputs)
    slots = (pruned.input_ids == model.config.image_token_id) & pruned.attention_mask.bool()
    offset, counted = 0, []
    for i, sel in enumerate(attached.selections):  # the official code runs one image at a time
        features, idx = prumerge_reference(twin.model.vision_tower, inputs["pixel_values"][i:i + 1], None,
                                           if_adaptive=True)
        with torch.no_grad():
            want = twin.model.multi_modal_projector(features)[0]
        got = pruned.inputs_embeds[slots][offset:offset + sel.k]
        offset += sel.k
        if idx.shape[1] == 0:  # no outlier: the official code keeps no token, resprune at least one
            assert sel.k == 2
            continue
        counted.append(sel.k)
        assert sel.k == idx.shape[1] + 1
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert counted == [3]  # the third photo's two outliers and the sum of the rest; the batch mixed 2, 2, 3


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 3), n=st.integers(4, 300), spread=st.floats(0.1, 3.0))
def test_the_iqr_count_is_the_official_outlier_count(seed, b, n, spread):
    torch.manual_seed(seed)
    scores = torch.exp(spread * torch.randn(b, n))  # heavy-tailed, as CLS attention is
    counts = TopK(score="s", count="iqr").count({"s": scores}, resprune.PruneContext(torch.randn(b, n, 4)))
    assert counts == [int(n * outlier_dectection(row)) for row in scores]
