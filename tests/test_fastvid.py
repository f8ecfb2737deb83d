"""FastVID against a literal transcription of its official code, on random videos and through a
pipeline on the tiny LLaVA-OneVision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import resprune
from resprune.strategies.fastvid import FastVIDParams, fastvid_plan


def official(hidden: torch.Tensor, attn: torch.Tensor, glob: torch.Tensor, r: float, c: int, tau: float,
             d_: float, p_: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LunarShen/FastVID @ a40a109, fastvid_llavaonevision/.../modeling_qwen2.py, Qwen2Model.forward's
    FastVID block, transcribed literally on one video's frame tokens (video_start_idx 0, no text
    around it; the density noise left out: ties then go to torch.topk's choice)."""
    frame_num, frame_token_len, hidden_states_dim = hidden.shape
    device_type = hidden.device
    video_token_len = frame_num * frame_token_len
    batchframe_indices = torch.arange(frame_num, device=device_type).unsqueeze(1)
    alltoken_indices = torch.arange(video_token_len, device=device_type).view(frame_num, frame_token_len)
    video_hidden_states = hidden
    frame_attn_weights = attn.reshape(frame_num, frame_token_len)
    frame_global_features = glob / glob.norm(dim=1, keepdim=True)
    similarity_matrix = (frame_global_features[:-1] * frame_global_features[1:]).sum(dim=1)
    cut_indices_topk = torch.topk(similarity_matrix, c - 1, largest=False).indices
    cut_indices_cos = torch.nonzero(similarity_matrix < tau, as_tuple=False).squeeze(1)
    cut_indices = torch.unique(torch.cat([cut_indices_topk, cut_indices_cos])).sort().values
    padded = F.pad(cut_indices, (1, 1), value=-1)
    padded[-1] = frame_num - 1
    segment_sizes = padded.diff().tolist()
    keep_indexs, final_tokens = (), []
    frame_retain_num = int(frame_token_len * r)
    frame_salient_num = frame_retain_num - int(frame_retain_num * d_)
    frm_context_num_list = torch.zeros(frame_num, dtype=torch.int, device=device_type)
    frame_context_num = frame_retain_num - frame_salient_num
    offset = 0
    for seg_i_len in segment_sizes:
        seg_context_num = frame_context_num * seg_i_len
        temp_num = (seg_i_len + p_ - 1) // p_
        cur_frm_context_num = seg_context_num // temp_num
        end = offset + seg_i_len
        seg_indices = torch.arange(seg_i_len - 1, -1, -1, device=device_type)
        mask = (seg_indices % p_ == 0)
        frm_context_num_list[offset:end][mask] = cur_frm_context_num
        offset = end
    salient_indexes = torch.topk(frame_attn_weights, frame_salient_num, dim=1).indices
    batch_indices = batchframe_indices.expand(-1, frame_salient_num)
    salient_tokens = video_hidden_states[batch_indices, salient_indexes]
    salient_global_indexes = alltoken_indices[batch_indices, salient_indexes]
    final_tokens.append(salient_tokens.view(-1, hidden_states_dim))
    keep_indexs += (salient_global_indexes.view(-1),)
    all_indices = torch.arange(frame_token_len, device=device_type).unsqueeze(0).expand(frame_num, -1)
    all_indices_mask = torch.ones_like(all_indices, dtype=torch.bool)
    all_indices_mask.scatter_(1, salient_indexes, False)
    filtered_indices = all_indices[all_indices_mask].view(frame_num, frame_token_len - frame_salient_num)
    batch_indices = batchframe_indices.expand(-1, frame_token_len - frame_salient_num)
    token_filtered = video_hidden_states[batch_indices, filtered_indices]
    alltoken_filtered_indices = alltoken_indices[batch_indices, filtered_indices]
    tmp_frm_hidden_states = token_filtered
    dist_matrix = torch.cdist(tmp_frm_hidden_states.float(), tmp_frm_hidden_states.float()) / (hidden_states_dim ** 0.5)
    dist_nearest, index_nearest = torch.topk(dist_matrix, k=4, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    density_mask = density[:, None, :] > density[:, :, None]
    density_mask = density_mask.type(tmp_frm_hidden_states.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist_0, index_parent = (dist_matrix * density_mask + dist_max * (1 - density_mask)).min(dim=-1)
    density_score = dist_0 * density
    sampled_indexs = torch.topk(density_score, k=frame_context_num, dim=-1).indices
    batch_indices = batchframe_indices.expand(-1, frame_context_num)
    frm_context_tokens = token_filtered[batch_indices, sampled_indexs]
    frm_context_global_indexes = alltoken_filtered_indices[batch_indices, sampled_indexs]
    to_be_merge_tokens = token_filtered / token_filtered.norm(dim=-1, keepdim=True)
    merge_target_tokens = to_be_merge_tokens[batch_indices, sampled_indexs]
    similarity = torch.bmm(to_be_merge_tokens, merge_target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(frame_num, frame_token_len - frame_salient_num, frame_context_num,
                                 dtype=token_filtered.dtype, device=device_type)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    avg_weights = (1 / (assign_one_hot.sum(dim=1).unsqueeze(-1) + 1)).clamp(min=beta)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), token_filtered) / counts
    frm_context_tokens = avg_weights * frm_context_tokens + (1 - avg_weights) * aggregated_hidden
    context_for_frame_mask = (frm_context_num_list == frame_context_num)
    context_for_frame_tokens = frm_context_tokens[context_for_frame_mask]
    context_for_frame_global_indexes = frm_context_global_indexes[context_for_frame_mask]
    final_tokens.append(context_for_frame_tokens.view(-1, hidden_states_dim))
    keep_indexs += (context_for_frame_global_indexes.view(-1),)
    idx_seg_start = 0
    for seg_i_len in segment_sizes:
        if seg_i_len > 1:
            cur_seg_context_num_list = frm_context_num_list[idx_seg_start:idx_seg_start + seg_i_len]
            cur_seg_context_num = cur_seg_context_num_list[-1]
            cur_seg_target_mask = (cur_seg_context_num_list > frame_context_num)
            cur_seg_target_num = cur_seg_target_mask.sum()
            cur_seg_density_score = density_score[idx_seg_start:idx_seg_start + seg_i_len]
            cur_seg_density_score = cur_seg_density_score[cur_seg_target_mask]
            cur_seg_token_filtered = token_filtered[idx_seg_start:idx_seg_start + seg_i_len]
            cur_seg_token_target = cur_seg_token_filtered[cur_seg_target_mask]
            cur_seg_token_filtered = cur_seg_token_filtered.view(1, -1, hidden_states_dim).expand(cur_seg_target_num, -1, -1)
            cur_seg_alltoken_indices = alltoken_filtered_indices[idx_seg_start:idx_seg_start + seg_i_len]
            cur_seg_alltoken_indices = cur_seg_alltoken_indices[cur_seg_target_mask]
            sampled_indexs = torch.topk(cur_seg_density_score, k=cur_seg_context_num, dim=-1).indices
            batch_indices = batchframe_indices[:cur_seg_target_num].expand(-1, cur_seg_context_num)
            cur_context_tokens = cur_seg_token_target[batch_indices, sampled_indexs]
            cur_context_global_indexes = cur_seg_alltoken_indices[batch_indices, sampled_indexs]
            to_be_merge_tokens = cur_seg_token_filtered / cur_seg_token_filtered.norm(dim=-1, keepdim=True)
            merge_target_tokens = cur_context_tokens / cur_context_tokens.norm(dim=-1, keepdim=True)
            similarity = torch.bmm(to_be_merge_tokens, merge_target_tokens.transpose(1, 2))
            assign_one_hot = torch.zeros(cur_seg_target_num, to_be_merge_tokens.shape[1], cur_seg_context_num,
                                         dtype=token_filtered.dtype, device=device_type)
            assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
            avg_weights = (1 / (assign_one_hot.sum(dim=1).unsqueeze(-1) + 1)).clamp(min=beta)
            counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
            aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), cur_seg_token_filtered) / counts
            cur_context_tokens = avg_weights * cur_context_tokens + (1 - avg_weights) * aggregated_hidden
            final_tokens.append(cur_context_tokens.view(-1, hidden_states_dim))
            keep_indexs += (cur_context_global_indexes.view(-1),)
        idx_seg_start += seg_i_len
    hidden_states = torch.cat(final_tokens, dim=0)
    keep_indexs = torch.cat(keep_indexs, dim=0)
    sorted_indexs = torch.argsort(keep_indexs)
    return keep_indexs[sorted_indexs], hidden_states[sorted_indexs]


@settings(max_examples=60, deadline=None)
@given(f=st.integers(8, 20), side=st.integers(3, 6), d=st.integers(2, 12), r=st.sampled_from([0.1, 0.25, 0.5]),
       c=st.integers(1, 8), tau=st.sampled_from([0.0, 0.5, 0.9]), p=st.integers(1, 4), seed=st.integers(0, 999))
def test_fastvid_keeps_and_merges_what_the_official_code_does(f, side, d, r, c, tau, p, seed):
    gen = torch.Generator().manual_seed(seed)
    per = side * side
    hidden = torch.randn(f, per, d, generator=gen)
    attn = torch.rand(f, per, generator=gen)
    glob = torch.randn(f, 6, generator=gen) + 2 * torch.randn(1, 6, generator=gen)  # some frames alike
    params = FastVIDParams(retention_ratio=r, dyseg_c=c, dyseg_tau=tau, dtm_p=p)
    try:
        want_idx, want = official(hidden, attn, glob, r, c, tau, params.stprune_d, p, params.dtm_beta)
    except (RuntimeError, IndexError):  # the official code fails: a topk asking for more than there is, or no context
        return
    plan = fastvid_plan(hidden, attn, glob, params)
    assert plan.kept.tolist() == want_idx.tolist()
    torch.testing.assert_close(plan.features, want, rtol=1e-5, atol=1e-6)


def test_the_fastvid_config_on_the_tiny_llava_onevision_keeps_its_count():
    """Through a pipeline: the selector keeps FastVID's count (salient plus context tokens, the
    newline after the video too) and the merger gives the context tokens their merged features."""
    from resprune.models import load_model
    from resprune.video import demo_clip, video_chat_inputs

    model, proc = load_model("tiny:llava_onevision")
    inputs = video_chat_inputs(proc, [[demo_clip("pan", frames=8)]], ["What moves?"])
    with resprune.load_pipeline("fastvid").attach(model, proc) as attached, torch.no_grad():
        model(**inputs)
    (sel,) = attached.selections
    per = 14 * 14
    retain = int(per * 0.10)
    assert sel.n == 8 * per + 1 and sel.kept[-1] == 8 * per  # the newline is kept
    salient = retain - int(retain * 0.4)
    assert sel.k >= 8 * salient + 1 and sel.features is not None
    with resprune.load_pipeline("fastvid", budget=20).attach(model, proc) as capped, torch.no_grad():
        model(**inputs)  # a cap below FastVID's count: the first 20 of its tokens, FastVID's features
    (part,) = capped.selections
    assert part.k == 20 and torch.equal(part.kept, sel.kept[:20])
    torch.testing.assert_close(part.features, sel.features[:20])
    qwen, qproc = load_model("tiny:qwen2_5_vl")
    with pytest.warns(UserWarning, match="backbone.params are ignored"), \
            pytest.raises(resprune.MissingContextError, match="frame_attention"):
        resprune.load_pipeline("fastvid").attach(qwen, qproc)


def test_the_siglip_head_comes_from_where_siglip_head_says(tmp_path, monkeypatch):
    """``auto`` uses a tiny model's own head and refuses a real checkpoint's (the Hugging Face
    LLaVA-OneVision checkpoints do not carry one); a SigLIP checkpoint folder gives the same head."""
    from transformers import SiglipVisionModel

    from resprune.models import load_model
    from resprune.video import demo_clip, video_chat_inputs

    model, proc = load_model("tiny:llava_onevision")
    inputs = video_chat_inputs(proc, [[demo_clip("cut", frames=8)]], ["?"])

    def kept(*overrides):
        with resprune.load_pipeline("fastvid", list(overrides)).attach(model, proc) as attached, torch.no_grad():
            model(**inputs)
        return attached.selections[0]

    auto = kept()
    tower = model.model.vision_tower
    folder = tmp_path / "siglip"
    SiglipVisionModel(tower.config).save_pretrained(folder)  # random weights, then the tower's own
    loaded = SiglipVisionModel.from_pretrained(folder)
    loaded.load_state_dict(tower.state_dict())
    loaded.save_pretrained(folder)
    from_folder = kept(f"backbone.params.siglip_head={folder}")
    assert torch.equal(auto.kept, from_folder.kept) and torch.allclose(auto.features, from_folder.features)
    with pytest.raises(resprune.ConfigError, match="not a SigLIP vision checkpoint"):
        kept(f"backbone.params.siglip_head={tmp_path / 'missing'}")
    monkeypatch.delattr(model.config.vision_config, "resprune_tiny")
    with pytest.raises(resprune.MissingContextError, match="siglip_head=google/siglip-so400m-patch14-384"):
        kept()
    assert torch.equal(kept("backbone.params.siglip_head=tower").kept, auto.kept)
