"""FastVID (Shen et al., 2025), as its official code runs it on LLaVA-OneVision.

``LunarShen/FastVID`` @ a40a109, ``fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/
modeling_qwen2.py`` (``Qwen2Model.forward``, the FastVID block) with the frame attention and frame
features of ``llava_arch.py`` (``encode_images``, ``get_attn_2dPool``) and ``siglip_encoder.py``
(``SigLipVisionAbstract``: the SigLIP tower's ``post_layernorm`` and attention-pooling head on the
tower's features). On a video of ``F`` frames of ``P`` tokens:

1. **DySeg**: cut the video where consecutive frames' pooled features are least similar (the
   ``c - 1`` lowest cosine similarities) or below ``tau``;
2. **STPrune**, per frame ``int(P r)`` tokens: the ``salient`` ones with the highest attention of the
   pooling head (ATS), the rest ``context`` tokens chosen by density (DPC-style: a token's
   distance to the nearest denser token times its density over its 4 nearest neighbours) among
   the frame's other tokens;
3. **DTM**: a single-frame segment keeps its frame's context tokens, each merged with the
   frame's tokens most similar to it; a longer segment puts its context budget on its anchor
   frames (the last frame and every ``p``-th one before it), whose context tokens absorb the
   whole segment's tokens. A context token becomes ``w c + (1 - w) mean(members)`` with
   ``w = max(1 / (members + 1), beta)``.

The ``fastvid`` selector keeps the salient and context tokens (its own count: the stage's budget
only caps it); the ``fastvid`` merger gives the kept context tokens their merged features. Both read
the frames (``frames``), the pooling head's attention (``frame_attention``) and each frame's
pooled feature (``frame_features``), which the LLaVA-OneVision injector supplies. Where resprune
differs: ties go to the lower index (the official code adds ``1e-6`` uniform noise to the
densities, so its ties fall at random); a video of fewer than ``c`` frames is cut at all of its
frame boundaries that qualify (the official ``topk`` fails there); tokens after the frame grid
(OneVision's newline) are kept, as the official code keeps the tokens after the video.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.errors import InvalidInputError
from resprune.interfaces import Merger, Selector
from resprune.params import check_range
from resprune.image_selection import frame_grid

FIELDS = frozenset({"frames", "frame_attention", "frame_features"})


@dataclass
class FastVIDParams:
    """FastVID's settings (its lmms-eval model's defaults)."""

    retention_ratio: float = 0.10
    """``r``: the share of each frame's tokens kept (salient plus context)."""
    dyseg_c: int = 8
    """DySeg: at least ``c`` segments (the ``c - 1`` least similar frame boundaries are cuts)."""
    dyseg_tau: float = 0.9
    """DySeg: every boundary whose frame similarity is below ``tau`` is a cut too."""
    stprune_d: float = 0.4
    """STPrune: the share of each frame's kept tokens that are context tokens (chosen by density)."""
    dtm_p: int = 4
    """DTM: in a segment of several frames, every ``p``-th frame (from the last) is an anchor."""
    dtm_beta: float = 0.6
    """DTM: the least weight a context token keeps of itself when it absorbs its members."""

    def __post_init__(self) -> None:
        check_range("retention_ratio", self.retention_ratio, low=0.0, high=1.0)
        check_range("dyseg_tau", self.dyseg_tau, low=-1.0, high=1.0)
        check_range("stprune_d", self.stprune_d, low=0.0, high=1.0)
        check_range("dtm_beta", self.dtm_beta, low=0.0, high=1.0)
        for name in ("dyseg_c", "dtm_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class Plan(NamedTuple):
    """What FastVID keeps of one video's frame grid: ``kept`` (ascending, into the grid) and their
    features (merged for the context tokens)."""

    kept: Tensor
    features: Tensor


def segments(frame_features: Tensor, c: int, tau: float) -> list[int]:
    """DySeg: the lengths of the segments of ``F`` frames, from their pooled features ``[F, C]``."""
    f = frame_features.shape[0]
    g = frame_features.float() / frame_features.float().norm(dim=1, keepdim=True)
    similarity = (g[:-1] * g[1:]).sum(dim=1)  # [F - 1]
    lowest = torch.sort(similarity, stable=True).indices[: min(c - 1, f - 1)]
    below = torch.nonzero(similarity < tau).squeeze(1)
    cuts = torch.unique(torch.cat([lowest, below])).tolist()
    bounds = [-1, *cuts, f - 1]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _merge(context: Tensor, members: Tensor, beta: float) -> Tensor:
    """DTM: each of ``members`` ``[T, M, D]`` joins its most cosine-similar context token of
    ``context`` ``[T, K, D]``; a context token becomes ``w c + (1 - w) mean(members)``."""
    unit_m = members / members.norm(dim=-1, keepdim=True)
    unit_c = context / context.norm(dim=-1, keepdim=True)
    assign = torch.bmm(unit_m, unit_c.transpose(1, 2)).argmax(dim=2)  # [T, M], the first maximum
    one_hot = torch.zeros(*assign.shape, context.shape[1], dtype=members.dtype, device=members.device)
    one_hot.scatter_(2, assign.unsqueeze(-1), 1)
    counts = one_hot.sum(dim=1).unsqueeze(-1)  # [T, K, 1]
    weight = (1 / (counts + 1)).clamp(min=beta)
    mean = torch.bmm(one_hot.transpose(1, 2), members) / counts.clamp(min=1)
    return weight * context + (1 - weight) * mean


def fastvid_plan(tokens: Tensor, attention: Tensor, frame_features: Tensor, p: FastVIDParams) -> Plan:
    """FastVID on one video's frame grid: ``tokens`` ``[F, P, D]`` (the LLM's input embeddings of the
    frames), ``attention`` ``[F, P]`` (the pooling head's attention, pooled like the tokens) and
    ``frame_features`` ``[F, C]`` (the pooling head's output per frame)."""
    f, per, d = tokens.shape
    x = tokens.float()
    device = x.device
    retain = int(per * p.retention_ratio)
    salient = retain - int(retain * p.stprune_d)
    context = retain - salient
    sizes = segments(frame_features, p.dyseg_c, p.dyseg_tau)
    context_of = torch.zeros(f, dtype=torch.long, device=device)  # context tokens each frame gets
    offset = 0
    for length in sizes:
        total = context * length
        share = total // ((length + p.dtm_p - 1) // p.dtm_p)
        back = torch.arange(length - 1, -1, -1, device=device)  # frames from the segment's last
        context_of[offset: offset + length][back % p.dtm_p == 0] = share
        offset += length
    # ATS: the most attended tokens of each frame; ties to the lower index
    order = torch.sort(attention.float(), dim=1, descending=True, stable=True).indices
    salient_idx = order[:, :salient]  # [F, S]
    rest_mask = torch.ones(f, per, dtype=torch.bool, device=device)
    rest_mask.scatter_(1, salient_idx, False)
    rest = torch.arange(per, device=device).expand(f, per)[rest_mask].view(f, per - salient)  # ascending
    members = x.gather(1, rest.unsqueeze(-1).expand(-1, -1, d))  # [F, R, D]
    # density peaks over each frame's other tokens
    dist = torch.cdist(members, members) / d**0.5
    nearest = torch.sort(dist, dim=-1, stable=True).values[..., : min(4, per - salient)]
    density = (-(nearest**2).mean(dim=-1)).exp()  # [F, R]
    denser = density[:, None, :] > density[:, :, None]
    dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
    to_denser = torch.where(denser, dist, dist_max).min(dim=-1).values
    score = to_denser * density
    keep_salient = salient_idx + torch.arange(f, device=device)[:, None] * per
    kept, feats = [keep_salient.flatten()], [x.view(f * per, d)[keep_salient.flatten()]]
    # single-frame segments: each frame's context tokens absorb that frame's other tokens
    single = context_of == context
    if context and bool(single.any()):
        picks = torch.sort(score[single], dim=-1, descending=True, stable=True).indices[:, :context]
        m = members[single]
        merged = _merge(m.gather(1, picks.unsqueeze(-1).expand(-1, -1, d)), m, p.dtm_beta)
        index = rest[single].gather(1, picks) + torch.nonzero(single).squeeze(1)[:, None] * per
        kept.append(index.flatten())
        feats.append(merged.reshape(-1, d))
    # longer segments: the anchor frames' context tokens absorb every other token of the segment
    start = 0
    for length in sizes:
        if length > 1:
            frames = torch.arange(start, start + length, device=device)
            share = int(context_of[start + length - 1])
            anchors = frames[context_of[frames] > context]
            if share and anchors.numel():
                picks = torch.sort(score[anchors], dim=-1, descending=True, stable=True).indices[:, :share]
                targets = members[anchors].gather(1, picks.unsqueeze(-1).expand(-1, -1, d))
                pool = members[frames].reshape(1, -1, d).expand(anchors.numel(), -1, -1)
                kept.append((rest[anchors].gather(1, picks) + anchors[:, None] * per).flatten())
                feats.append(_merge(targets, pool, p.dtm_beta).reshape(-1, d))
        start += length
    index = torch.cat(kept)
    order = torch.argsort(index)
    return Plan(index[order], torch.cat(feats)[order])


def _plans(tokens: Tensor, context: PruneContext, params: FastVIDParams, who: str) -> list[Plan]:
    """FastVID's plan of each image of the context (a video; tokens after its grid are kept)."""
    b, n, d = tokens.shape
    frames = torch.as_tensor(context.get("frames", requester=who)).to(tokens.device)
    t, per = frame_grid(frames, n, who)
    attention = torch.as_tensor(context.get("frame_attention", requester=who)).to(tokens.device).float()
    features = torch.as_tensor(context.get("frame_features", requester=who)).to(tokens.device).float()
    if attention.shape[:2] != (b, n) or features.shape[:2] != (b, n):
        raise InvalidInputError(f"{who}: frame_attention must be [B, N] and frame_features [B, N, C] for tokens "
                                f"[{b}, {n}, {d}], got {tuple(attention.shape)} and {tuple(features.shape)}.")
    grid = t * per
    out = []
    for i in range(b):
        plan = fastvid_plan(tokens[i, :grid].reshape(t, per, d), attention[i, :grid].reshape(t, per),
                            features[i, :grid:per], params)
        tail = torch.arange(grid, n, device=tokens.device)
        out.append(Plan(torch.cat([plan.kept, tail]), torch.cat([plan.features, tokens[i, grid:].float()])))
    return out


class FastVID(Selector):
    """FastVID's kept tokens: each frame's salient tokens and its segment's context tokens."""

    name = "fastvid"
    description = "FastVID: DySeg segments, then each frame's salient (pooling-head attention) and context (density) tokens"
    requires = FIELDS
    Params = FastVIDParams

    @property
    def adaptive(self) -> bool:
        return True

    def count(self, scores: Mapping[str, Tensor], context: PruneContext) -> list[int]:
        return [int(plan.kept.numel()) for plan in _plans(context.tokens, context, self.params, "selector 'fastvid'")]

    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        plans = _plans(tokens, context, self.params, "selector 'fastvid'")
        if len({plan.kept.numel() for plan in plans}) > 1:
            raise InvalidInputError("selector 'fastvid' keeps a different count of each video; it runs one at a time.")
        kept = torch.stack([plan.kept for plan in plans])
        if k < kept.shape[1]:  # a budget below FastVID's count: the first k in index order
            return kept[:, :k]
        if k > kept.shape[1]:  # called directly for more: the other tokens follow, in index order
            n = tokens.shape[1]
            rest = [torch.tensor([j for j in range(n) if j not in set(plan.kept.tolist())], device=tokens.device)
                    for plan in plans]
            kept = torch.cat([kept, torch.stack(rest)[:, : k - kept.shape[1]]], dim=1)
        return kept


class FastVIDMerge(Merger):
    """FastVID's DTM: the context tokens the ``fastvid`` selector kept, merged with their members."""

    name = "fastvid"
    description = "FastVID's DTM: each context token merged with the segment tokens most similar to it"
    requires = FIELDS
    Params = FastVIDParams

    def merge(self, tokens: Tensor, kept: Tensor, slots: int, scores: Mapping[str, Tensor],
              context: PruneContext) -> tuple[Tensor, Tensor]:
        """Each kept token that FastVID keeps (with these params) gets FastVID's feature (merged for a
        context token); any other keeps its own, so under a capped budget or another selector the
        kept context tokens are still merged."""
        plans = _plans(tokens, context, self.params, "merger 'fastvid'")
        kept = kept.sort(dim=1).values
        out = tokens.float().gather(1, kept.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])).clone()
        for row, plan in enumerate(plans):
            where = torch.full((tokens.shape[1],), -1, dtype=torch.long, device=tokens.device)
            where[plan.kept] = torch.arange(plan.kept.numel(), device=tokens.device)
            slot = where[kept[row]]
            hit = slot >= 0
            out[row, hit] = plan.features[slot[hit]].to(out.dtype)
        return kept, out


@hookimpl
def resprune_register_selectors(register: Any) -> None:
    register(FastVID)


@hookimpl
def resprune_register_mergers(register: Any) -> None:
    register(FastVIDMerge)
