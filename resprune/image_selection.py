"""Per-image selection: what a backbone knows about each image (``EncodedImage``), what was
kept of it (``ImageSelection``), and running a pipeline over a call's images, grouped by
geometry and split over tiles (``select_images``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .context import PruneContext
from .errors import InvalidInputError

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["EncodedImage", "ImageSelection", "select_images", "proportional_shares", "frame_grid", "frame_grid_shape",
           "frame_residual_energy"]


@dataclass
class EncodedImage:
    """One image's visual tokens as the LLM would receive them, plus what is known about them.

    Attributes:
        features: ``[N, D]`` projector output (LLM input-embedding space, model dtype).
        grid: ``(rows, cols)`` when the ``N`` tokens form one raster-ordered grid.
        positions: ``[N, 2]`` token centres (row, col) in grid units; NaN for non-spatial ones.
        cls_attention: ``[N]`` vision-tower CLS->patch attention, if requested and available.
        tiles: int ``[N]`` the tile of each token when an image is split into tiles: 0 the
            base (overview) image, 1.. the crops in raster order, -1 tokens of no tile (newlines).
        frames: int ``[N]`` the frame of each token of a video (its temporal patch: Qwen2.5-VL puts
            2 frames in one), ``0, 1, ...`` in time order; ``None`` for an image.
        extra: further per-token context fields by name, each ``[N, ...]`` (e.g.
            ``vision_features`` ``[N, C]``), only those the pipeline asked for.
        image_extra: per-image context fields by name (e.g. ``vision_cls`` ``[C]``), stacked
            ``[B, ...]`` for the context.
        candidates: bool ``[N]``, the tokens the selector may pick (``None``: all).
        always: bool ``[N]``, tokens kept whatever the selector does (``None``: none).
        groups: int ``[N]``, a group id per token when the budget applies per group (tiles).
        layout: backbone-specific geometry for pictures (tiles, image size, ...).
        vision_masks: bool ``[N]`` per stage inside the vision tower: the tokens still there after
            it (the others were pruned in the tower; their ``features`` are zeros).
        tower_schedule: ``(first encoder layer, tokens per tile)`` pairs the vision tower ran on.
        tower_tiles: how many tiles of this image went through the tower.
        deepstack: ``[N, D]`` per LLM layer ``0, 1, ...``: features the model adds to each
            token's hidden state after that decoder layer (Qwen3-VL's DeepStack); a kept token
            keeps its own, a dropped token's are dropped with it.
    """

    features: Tensor
    grid: tuple[int, int] | None = None
    positions: Tensor | None = None
    cls_attention: Tensor | None = None
    tiles: Tensor | None = None
    frames: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)
    image_extra: dict[str, Tensor] = field(default_factory=dict)
    candidates: Tensor | None = None
    always: Tensor | None = None
    groups: Tensor | None = None
    layout: dict[str, Any] = field(default_factory=dict)
    vision_masks: list[Tensor] = field(default_factory=list)
    tower_schedule: list[tuple[int, int]] = field(default_factory=list)
    tower_tiles: int = 0
    deepstack: list[Tensor] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.features.shape[0]

    def present(self) -> Tensor | None:
        """Indices of the tokens that came out of the vision tower (``None``: all of them)."""
        if not self.vision_masks or bool(self.vision_masks[-1].all()):
            return None
        return self.vision_masks[-1].nonzero().squeeze(1).cpu()

    def token_positions(self) -> Tensor | None:
        """``positions``, or the raster positions of ``grid`` when only the grid is known."""
        if self.positions is None and self.grid is not None:
            rows, cols = self.grid
            return torch.stack([torch.arange(rows, dtype=torch.float32).repeat_interleave(cols),
                                torch.arange(cols, dtype=torch.float32).repeat(rows)], dim=1)
        return self.positions

    def subset(self, index: Tensor) -> EncodedImage:
        """This image restricted to the tokens ``index`` (ascending), positions kept."""
        idx = index.cpu()

        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx.to(t.device)]

        return EncodedImage(take(self.features), positions=take(self.token_positions()), cls_attention=take(self.cls_attention),
                            tiles=take(self.tiles), frames=take(self.frames),
                            extra={k: v[idx.to(v.device)] for k, v in self.extra.items()},
                            image_extra=self.image_extra, candidates=take(self.candidates), always=take(self.always),
                            groups=take(self.groups), layout=self.layout,
                            deepstack=[d[idx.to(d.device)] for d in self.deepstack])


@dataclass
class ImageSelection:
    """What was kept of one image.

    Attributes:
        row: batch row of the prompt the image belongs to.
        image: index of the image among all images of the call.
        kept: int64 ``[k]`` kept token indices, ascending (what the LLM gets).
        order: int64 ``[k]`` the same indices in the order they were picked.
        k: tokens kept.
        n: tokens before pruning.
        text: the instruction the text-conditioned scorers saw ("" when none was needed).
        scores: the named scores ``[N]`` that were computed.
        geometry: the image's ``EncodedImage`` without features (grid, positions, layout).
        features: float32 ``[k, D]`` the features at the kept places when a merger ran
            (``None``: the kept tokens' own features).
        sources: int64 ``[k]`` the token each kept place holds when a merger ran (it may put
            its tokens in another order than their places; ``None``: ``kept``).
        merged: how many of the ``k`` tokens a merger made from dropped ones (``0``: none).
    """

    row: int
    image: int
    kept: Tensor
    order: Tensor
    k: int
    n: int
    text: str = ""
    scores: dict[str, Tensor] = field(default_factory=dict)
    geometry: EncodedImage | None = None
    features: Tensor | None = None
    sources: Tensor | None = None
    merged: int = 0

    def mask(self) -> Tensor:
        """Boolean ``[N]``: True where a token is kept."""
        m = torch.zeros(self.n, dtype=torch.bool, device=self.kept.device)
        return m.index_fill_(0, self.kept, True)


def _geometry_key(img: EncodedImage) -> tuple[Any, ...]:
    def key(t: Tensor | None) -> Any:
        return None if t is None else (tuple(t.shape), hash(t.cpu().numpy().tobytes()))

    return (img.n, img.grid, key(img.positions), key(img.candidates), key(img.always), key(img.groups),
            key(img.tiles), key(img.frames), img.cls_attention is not None, tuple(sorted(img.extra)), tuple(sorted(img.image_extra)))


def select_images(pipeline: Pipeline, images: list[EncodedImage], rows: list[int], row_text: Callable[[int], str],
                  embedder: Callable[[str], Tensor] | None, *, source: str = "backbone",
                  fields: dict[str, Any] | None = None) -> list[ImageSelection]:
    """Run the pipeline over every image (``rows``: each image's prompt row); images of equal
    geometry go through as one batch, each group of tiles with its share of the budget.
    ``fields``: context fields of the model rather than of an image (e.g. ``projector``)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    alone = pipeline.input_stage is not None and pipeline.input_stage.selector.adaptive  # a count per image
    for i, img in enumerate(images):
        by_energy = img.frames is not None and pipeline.video_allocation == "energy"  # shares of its own features
        groups.setdefault((i,) if alone or by_energy else _geometry_key(img), []).append(i)
    out: list[ImageSelection | None] = [None] * len(images)
    needs_text = bool({"text", "text_embedder"} & pipeline.requires)
    for members in groups.values():
        first = images[members[0]]
        feats = torch.stack([images[i].features for i in members]).float()
        cls = (torch.stack([images[i].cls_attention for i in members]).float()
               if first.cls_attention is not None else None)
        extra = {name: torch.stack([images[i].extra[name] for i in members]).float() for name in first.extra}
        per_image = {name: torch.stack([images[i].image_extra[name] for i in members]).float()
                     for name in first.image_extra}
        texts = [row_text(rows[i]) for i in members] if needs_text else None  # decoded once, reused
        subsets = _subsets(first)
        kept_all: list[list[Tensor]] = [[] for _ in members]
        order_all: list[list[Tensor]] = [[] for _ in members]
        merged_all: list[list[Tensor | None]] = [[] for _ in members]  # a merger's features per subset
        held_all: list[list[Tensor]] = [[] for _ in members]  # the token each kept place holds
        score_all: list[dict[str, Tensor]] = [{} for _ in members]
        merged_count = 0  # tokens a merger made, over the subsets (the same for every member)
        for idx, k in subsets(pipeline):
            if k == 0:
                continue
            whole = idx.numel() == first.n  # every token: no gathered copies
            ctx = PruneContext(
                feats if whole else feats[:, idx], source=source,
                text=lambda m=members: [row_text(rows[i]) for i in m],
                text_embedder=embedder,
                cls_attention=None if cls is None else (cls if whole else cls[:, idx]),
                tiles=None if first.tiles is None else (first.tiles if whole else first.tiles[idx]),
                frames=None if first.frames is None else (first.frames if whole else first.frames[idx]),
                **{name: value if whole else value[:, idx] for name, value in extra.items()},
                **per_image, **(fields or {}),
                grid=first.grid if whole else None,
                positions=None if first.positions is None else (first.positions if whole else first.positions[idx]),
            )
            sel = pipeline.run(ctx, k=k)
            merged_count += sel.merged
            kept, order, held = idx[sel.kept.cpu()], idx[sel.order.cpu()], idx[sel.held.cpu()]  # one copy per subset
            scores = {name: value.detach().float().cpu() for name, value in sel.scores.items()}
            for j in range(len(members)):
                kept_all[j].append(kept[j])
                held_all[j].append(held[j])
                order_all[j].append(order[j])
                merged_all[j].append(None if sel.features is None else sel.features[j])
                for name, value in scores.items():
                    full = torch.full((first.n,), float("nan"))
                    full[idx] = value[j]
                    prev = score_all[j].get(name)
                    score_all[j][name] = full if prev is None else torch.where(torch.isnan(full), prev, full)
        forced = None if first.always is None else first.always.nonzero().squeeze(1).cpu()
        for j, i in enumerate(members):
            parts = kept_all[j] + ([forced] if forced is not None else [])
            kept, place = torch.cat(parts).sort() if parts else (torch.zeros(0, dtype=torch.long),) * 2
            features = sources = None
            if any(f is not None for f in merged_all[j]):  # in the order of the kept places; a subset
                # without a merge (and the forced tokens) keeps its tokens' own features
                own = [feats[j, part.to(feats.device)] if f is None else f
                       for f, part in zip(merged_all[j], kept_all[j])]
                extra = [feats[j, forced.to(feats.device)]] if forced is not None else []
                features = torch.cat(own + extra)[place.to(feats.device)]
                sources = torch.cat(held_all[j] + ([forced] if forced is not None else []))[place]
            order = torch.cat(order_all[j] + ([forced] if forced is not None else []))
            geometry = EncodedImage(features=images[i].features[:0], grid=first.grid, positions=first.positions,
                                    tiles=first.tiles, frames=first.frames, candidates=first.candidates,
                                    always=first.always, groups=first.groups,
                                    layout=images[i].layout)
            out[i] = ImageSelection(row=rows[i], image=i, kept=kept, order=order, k=int(kept.numel()), n=first.n,
                                    text=texts[j] if texts else "", scores=score_all[j], geometry=geometry,
                                    features=features, sources=sources, merged=merged_count)
    return [s for s in out if s is not None]


def proportional_shares(k: int, weights: list[float], caps: list[int]) -> list[int]:
    """``k`` split over groups in proportion to ``weights`` (largest remainder, ties to the earlier
    group), no group above its cap: a group whose share would pass its cap gets the cap and the
    rest is split again over the others. All weights zero: in proportion to the caps. The shares
    add up to ``min(k, sum(caps))``."""
    share = [0] * len(caps)
    open_ = [i for i, c in enumerate(caps) if c > 0]
    left = min(k, sum(caps))
    while open_ and left > 0:
        w = [max(float(weights[i]), 0.0) for i in open_]
        if not sum(w) > 0:
            w = [float(caps[i]) for i in open_]
        total = sum(w)
        exact = {i: left * wi / total for i, wi in zip(open_, w)}
        over = [i for i in open_ if exact[i] > caps[i]]
        if over:  # these get their caps; split the rest again
            for i in over:
                share[i] = caps[i]
                left -= caps[i]
            open_ = [i for i in open_ if i not in over]
            continue
        floor = {i: int(exact[i]) for i in open_}
        for i in open_:
            share[i] = floor[i]
        for i in sorted(open_, key=lambda i: (-(exact[i] - floor[i]), i))[: left - sum(floor.values())]:
            share[i] += 1
        break
    return share


def frame_grid_shape(frames: Tensor, n: int) -> tuple[int, int] | None:
    """``(t, P)`` when a video's ``n`` tokens are ordered frame by frame, ``P`` in each of its ``t``
    frames, any tokens after the ``t * P`` of the grid belonging to the last frame (a newline);
    else ``None``."""
    frames = frames.long()
    t = int(frames.max()) + 1 if frames.numel() else 0
    per = int((frames == 0).sum()) if t else 0
    grid = t * per
    ordered = torch.arange(t, device=frames.device).repeat_interleave(per)
    if t == 0 or grid > n or not torch.equal(frames[:grid], ordered) or bool((frames[grid:] != t - 1).any()):
        return None
    return t, per


def frame_grid(frames: Tensor, n: int, who: str) -> tuple[int, int]:
    """``frame_grid_shape``, or ``InvalidInputError`` naming ``who`` (a strategy of videos)."""
    shape = frame_grid_shape(frames, n)
    if shape is None:
        raise InvalidInputError(f"{who} needs a video's tokens frame by frame, the same number in each ({n} tokens; "
                                f"frames {frames[:8].tolist()}...).")
    return shape


def frame_residual_energy(features: Tensor, frames: Tensor, rtol: float = 1e-6) -> Tensor:
    """``[N]`` each token's energy outside the span of the frame before its own (all of its energy
    in the first frame): ``|x|^2 - |P x|^2`` with ``P`` the projection onto the span of the previous
    frame's tokens, whose directions below ``rtol`` of the largest are dropped. In float64 (the
    Gram matrix of a frame that nearly spans its tokens' space loses the small residuals to float32
    rounding), one batched Gram, eigendecomposition and cross product over the frames; a token of no frame grid
    (after the last full frame) keeps its whole energy, and so does every token of frames that do
    not form a grid (``frame_grid_shape``)."""
    x = features.detach().double()
    energy = x.pow(2).sum(-1)
    shape = frame_grid_shape(frames.to(x.device), x.shape[0])
    if shape is None or shape[0] < 2:
        return energy
    t, per = shape
    grid = t * per
    v = x[:grid].view(t, per, -1)
    gram = v[:-1] @ v[:-1].transpose(1, 2)  # [t-1, per, per] of the previous frames
    evals, evecs = torch.linalg.eigh(gram)
    keep = evals > rtol * evals.amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    inv_sqrt = torch.where(keep, evals.clamp_min(torch.finfo(x.dtype).tiny).rsqrt(), torch.zeros_like(evals))
    cross = v[1:] @ v[:-1].transpose(1, 2)  # [t-1, per, per]: each token against the previous frame's
    coeff = (cross @ evecs) * inv_sqrt[:, None, :]  # coordinates in the previous frame's orthonormal basis
    residual = (energy[:grid].view(t, per)[1:] - coeff.pow(2).sum(-1)).clamp_min(0.0)
    out = energy.clone()
    out[per:grid] = residual.reshape(-1)
    return out


def _subsets(img: EncodedImage) -> Callable[[Pipeline], list[tuple[Tensor, int]]]:
    """The token subsets selection runs over, with the budget of each.

    The budget counts every token the LLM receives from the image: tokens that are always
    kept use up budget first; the rest is split over the groups (tiles; a video's frames under
    ``video.allocation: uniform``) in proportion to their sizes (largest remainder), over a
    video's frames in proportion to their residual energy (``energy``), or spent on all
    candidates at once.
    """

    def plan(pipeline: Pipeline) -> list[tuple[Tensor, int]]:
        n = img.n
        k_total = pipeline.budget_for(n)
        if (img.frames is not None and pipeline.video_budget_per == "frame" and pipeline.input_stage is not None
                and isinstance(pipeline.budget, int)):
            k_total = min(n, pipeline.budget * (int(img.frames.max()) + 1))  # the budget of every frame (pair)
        cand = torch.ones(n, dtype=torch.bool) if img.candidates is None else img.candidates.cpu().clone()
        always = torch.zeros(n, dtype=torch.bool) if img.always is None else img.always.cpu()
        cand &= ~always
        k = min(int(cand.sum()), max(k_total - int(always.sum()), 0))
        groups = img.groups
        if groups is None and img.frames is not None and pipeline.video_allocation in ("uniform", "energy"):
            groups = img.frames  # each frame its share of the video's budget
        if groups is None:
            return [(cand.nonzero().squeeze(1), k)]
        groups = groups.cpu()
        ids = sorted(set(groups[cand].tolist()))
        if img.groups is not None and 0 < k < len(ids):
            raise InvalidInputError(
                f"a budget of {k} token(s) for an image of {n} tokens in {len(ids)} tiles: with a budget per tile "
                f"(backbone.params.scope: per_tile) every tile needs at least one; raise the budget to {len(ids)} "
                f"or more, or set backbone.params.scope: global.")
        members = [(cand & (groups == g)).nonzero().squeeze(1) for g in ids]
        sizes = [int(m.numel()) for m in members]
        weights: list[float] = [float(s) for s in sizes]
        if img.groups is None and img.frames is not None and pipeline.video_allocation == "energy":
            energy = frame_residual_energy(img.features, img.frames)
            weights = [float(energy[m].sum()) for m in members]
        share = proportional_shares(k, weights, sizes)
        return list(zip(members, share))

    return plan
