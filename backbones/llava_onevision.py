"""LLaVA-OneVision (``llava_onevision``) on Hugging Face transformers: images and videos.

An image is LLaVA-NeXT's AnyRes layout on a SigLIP tower (no CLS token): the base tile's
grid, then the unpadded crops as one grid with a newline token after each row (bilinearly
shrunk when it holds more than ``anyres_max_9`` tiles' worth), or, for an image in a prompt
with several, its base tile and one newline. A video is ``t`` frames, each the 2x bilinear
pooling of its tile's grid, and one newline after the last frame. The layout is read off the
model's own ``pack_image_features`` and ``apply_pooling`` run on coordinate maps, so positions
and tiles always match the features the model produces. Positions are plain 1-D in the LLM,
so a pruned sequence needs nothing beyond the kept tokens and masks.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.errors import ConfigError, InvalidInputError, MissingContextError
from resprune.injection import EncodedImage, PlaceholderInjector, in_sequence_order
from resprune.params import check_choice

from .llava import LlavaNextInjector

__all__ = ["LlavaOnevisionInjector"]


class LlavaOnevisionInjector(LlavaNextInjector):
    """LLaVA-OneVision: AnyRes images (base tile, crops with row newlines) and videos (pooled
    frame grids, one newline per video) on a SigLIP tower; images and videos may be mixed."""

    name = "llava_onevision"
    model_types = ("llava_onevision",)
    description = "LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): AnyRes images and pooled videos"
    provides = PlaceholderInjector.provides | {"projector", "tiles", "frames", "frame_attention", "frame_features"}
    vision_provides = frozenset()
    vision_refusal = " (not yet: prune at the input stage or inside the LLM)"
    pixel_inputs = ("pixel_values", "pixel_values_videos")
    vision_inputs = ("pixel_values", "image_sizes", "batch_num_images", "vision_aspect_ratio", "pixel_values_videos",
                     "image_sizes_videos", "vision_feature_layer", "vision_feature_select_strategy")

    @dataclass
    class Params:
        scope: str = "global"
        """`global`: one budget over all of an image's tokens; `per_tile`: the budget is split
        over the base tile and each crop tile in proportion to their token counts."""
        image_newline: str = "candidate"
        """Newline tokens (a video's one too): `candidate` (compete like any token), `keep` (always
        kept, they use up budget first) or `drop` (never kept)."""
        siglip_head: str = "auto"
        """Where the SigLIP attention-pooling head comes from (`frame_attention` and
        `frame_features`, FastVID's): a SigLIP checkpoint (hub id or folder; FastVID's is
        `google/siglip-so400m-patch14-384`), `tower` (the vision tower's own, random in the Hugging
        Face LLaVA-OneVision checkpoints, which do not carry it) or `auto` (`tower` on a tiny model,
        else an error that says what to set)."""

        def __post_init__(self) -> None:
            check_choice("scope", self.scope, ("global", "per_tile"))
            check_choice("image_newline", self.image_newline, ("candidate", "keep", "drop"))
            if not isinstance(self.siglip_head, str) or not self.siglip_head:
                raise ValueError(f"siglip_head must be 'auto', 'tower' or a SigLIP checkpoint, got {self.siglip_head!r}")

    def placeholder_ids(self, model: Any) -> tuple[int, ...]:
        return (self.image_token_id(model), int(model.config.video_token_id))

    def model_fields(self, model: Any, need: frozenset[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "projector" in need:
            projector = model.model.multi_modal_projector
            dtype = next(projector.parameters()).dtype
            out["projector"] = lambda features: projector(features.to(dtype)).float()
        return out

    def encode(self, model: Any, inputs: Mapping[str, Any], need: frozenset[str], **kwargs: Any) -> list[EncodedImage]:
        from .llava import _feature_args

        layer, strategy = _feature_args(model, inputs)
        aspect = inputs.get("vision_aspect_ratio") or model.config.vision_aspect_ratio
        media: dict[int, list[EncodedImage]] = {}
        if inputs.get("pixel_values") is not None:
            sizes = inputs.get("image_sizes")
            if sizes is None:
                raise InvalidInputError("injector 'llava_onevision': image_sizes is required with pixel_values (pass "
                                        "the processor's output unchanged).")
            out = model.model.get_image_features(
                inputs["pixel_values"], sizes, vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                vision_aspect_ratio=aspect, batch_num_images=inputs.get("batch_num_images"), return_dict=True)
            tiles = _tiles_per_image(model, sizes, inputs.get("batch_num_images"))
            maps = self._maps(model, sizes, tiles, aspect)
            images = []
            for i, feats in enumerate(out.pooler_output):
                if maps[i].shape[0] != feats.shape[0]:
                    raise RuntimeError(f"LLaVA-OneVision layout has {maps[i].shape[0]} tokens but the model gave "
                                       f"{feats.shape[0]} for image {i}")
                side = _side(model)
                image = self._image(feats, maps[i], side, tuple(int(x) for x in sizes[i]), {}, {})
                image.tower_tiles = tiles[i]
                images.append(image)
            media[self.image_token_id(model)] = images
        if inputs.get("pixel_values_videos") is not None:
            media[int(model.config.video_token_id)] = self._videos(model, inputs["pixel_values_videos"], layer,
                                                                   strategy, need)
        return in_sequence_order(inputs, media, self.name)

    # --- images ---------------------------------------------------------------------------

    def _pack(self, model: Any, tiles: Tensor, sizes: Tensor, counts: list[int], aspect: str,
              newline: float = 0.0) -> list[Tensor]:
        packed, _ = model.model.pack_image_features(list(tiles.split(counts)), sizes,
                                                    image_newline=tiles.new_full((tiles.shape[-1],), newline),
                                                    vision_aspect_ratio=aspect)
        return list(packed)

    def _maps(self, model: Any, sizes: Tensor, counts: list[int], aspect: str) -> list[Tensor]:
        """Per image ``[N, 4]``: (tile, row, col, NaN) of each packed token, as ``_layout_maps``
        of LLaVA-NeXT; newlines NaN. Where the crops' grid is shrunk, rows and columns are the
        bilinear positions in the padded crop grid and the tile the nearest one's."""
        from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

        side = _side(model)
        r = torch.arange(side, dtype=torch.float32).repeat_interleave(side)
        c = torch.arange(side, dtype=torch.float32).repeat(side)
        coords = []
        for i, tiles in enumerate(counts):
            m = torch.full((tiles, side * side, 4), float("nan"))
            if tiles > 1:
                _, npw = get_anyres_image_grid_shape(sizes[i], model.config.image_grid_pinpoints,
                                                     model.config.vision_config.image_size)
            for t in range(tiles):
                m[t, :, 0] = t
                th, tw = divmod(t - 1, npw) if t else (0, 0)
                m[t, :, 1], m[t, :, 2] = th * side + r, tw * side + c
            coords.append(m)
        packed = self._pack(model, torch.cat(coords), sizes, counts, aspect, newline=float("nan"))
        out = []
        for p in packed:
            p = p.float().cpu()
            p[:, 0] = torch.where(torch.isnan(p[:, 0]), p[:, 0], p[:, 0].round())
            out.append(p)
        return out

    # --- videos ---------------------------------------------------------------------------

    def _videos(self, model: Any, pixels: Tensor, layer: Any, strategy: str, need: frozenset[str]) -> list[EncodedImage]:
        from .llava import ProjectorInput

        if pixels.dim() != 5:
            raise InvalidInputError(f"injector 'llava_onevision': pixel_values_videos must be [videos, frames, "
                                    f"channels, height, width], got shape {tuple(pixels.shape)}.")
        head = self._head(model) if need & {"frame_attention", "frame_features"} else None
        with ProjectorInput(model) if head is not None else contextlib.nullcontext() as pre:
            out = model.model.get_video_features(pixels, vision_feature_layer=layer,
                                                 vision_feature_select_strategy=strategy, return_dict=True)
        feats = out.pooler_output  # [videos, t * P, D]
        newline = model.model.image_newline[None, None, :].repeat(feats.shape[0], 1, 1).to(feats.device)
        feats = torch.cat((feats, newline), dim=1)  # as the model's forward: one newline per video
        t = pixels.shape[1]
        side = _side(model)
        pooled = _pooled_positions(model, side)  # [P, 2], in pooled-grid units
        rows = int(pooled[:, 0].max()) + 1
        cols = int(pooled[:, 1].max()) + 1
        per_frame = pooled.shape[0]
        positions = torch.cat([pooled.repeat(t, 1), torch.full((1, 2), float("nan"))])
        frames = torch.cat([torch.arange(t).repeat_interleave(per_frame), torch.tensor([t - 1])])
        is_newline = torch.zeros(feats.shape[1], dtype=torch.bool)
        is_newline[-1] = True
        policy = self.params.image_newline
        extra: list[dict[str, Tensor]] = [{} for _ in range(feats.shape[0])]
        if head is not None:
            attention, pooled = _pooling_head(head, pre.features, side, rows * cols)  # [V*t, P], [V*t, C]
            attention, pooled = attention.view(feats.shape[0], -1), pooled.view(feats.shape[0], t, -1)
            for i in range(feats.shape[0]):  # the newline: no attention, its (last) frame's feature
                extra[i] = {"frame_attention": torch.cat([attention[i], attention.new_zeros(1)]),
                            "frame_features": torch.cat([pooled[i].repeat_interleave(rows * cols, dim=0),
                                                         pooled[i, -1:]])}
        return [EncodedImage(f, positions=positions, frames=frames, extra=extra[i],
                             candidates=~is_newline if policy == "drop" else None,
                             always=is_newline if policy == "keep" else None,
                             layout={"kind": "video", "grid": (rows, cols), "temporal": t, "newline": is_newline})
                for i, f in enumerate(feats)]

    def _head(self, model: Any) -> Any:
        """The SigLIP tower's final layer norm and attention-pooling head ``(post_layernorm, head)``
        as ``siglip_head`` says."""
        source = self.params.siglip_head
        if source == "auto":
            if not getattr(model.config.vision_config, "resprune_tiny", False):
                raise MissingContextError(
                    "injector 'llava_onevision': frame_attention and frame_features (FastVID) come from SigLIP's "
                    "attention-pooling head, which Hugging Face's LLaVA-OneVision checkpoints do not carry: set "
                    "backbone.params.siglip_head=google/siglip-so400m-patch14-384 (FastVID's source; a local copy "
                    "works too), or siglip_head=tower to use the tower's own.")
            source = "tower"
        if source == "tower":
            return _norm_and_head(model.model.vision_tower, "the vision tower")
        return _load_head(source, str(model.device), str(next(model.parameters()).dtype))


def _pooling_head(head: Any, features: Tensor, side: int, pooled_tokens: int) -> tuple[Tensor, Tensor]:
    """FastVID's frame attention and frame features: the head's probe attention over the patch
    features ``[F, S, C]`` after the tower's final norm (mean over heads), pooled bilinearly like the
    tokens (``get_attn_2dPool``), ``[F, P]``; and the head's output ``[F, C]``."""
    norm, pool = head
    dtype = next(pool.parameters()).dtype
    h = norm(features.to(dtype))
    probe = pool.probe.repeat(h.shape[0], 1, 1)
    out, weights = pool.attention(probe, h, h)  # weights [F, 1, S], averaged over the heads
    out = out + pool.mlp(pool.layernorm(out))
    grid = weights.float().view(h.shape[0], 1, side, side)
    pooled_side = -(-side // 2)
    attention = torch.nn.functional.interpolate(grid, size=[pooled_side, pooled_side], mode="bilinear")
    if pooled_side * pooled_side != pooled_tokens:
        raise RuntimeError(f"LLaVA-OneVision pools {pooled_tokens} tokens per frame, the attention map "
                           f"{pooled_side * pooled_side}")
    return attention.view(h.shape[0], -1), out[:, 0].float()


@functools.cache
def _load_head(source: str, device: str, dtype: str) -> tuple[Any, Any]:
    """``(post_layernorm, head)`` of the SigLIP vision checkpoint ``source`` (hub id or folder)."""
    from transformers import SiglipVisionModel

    try:
        tower = SiglipVisionModel.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"backbone.params.siglip_head={source!r}: not a SigLIP vision checkpoint that loads here "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).") from None
    norm, head = _norm_and_head(tower, f"siglip_head={source!r}")
    torch_dtype = getattr(torch, dtype.removeprefix("torch."))
    return norm.to(device=device, dtype=torch_dtype).eval(), head.to(device=device, dtype=torch_dtype).eval()


def _norm_and_head(tower: Any, what: str) -> tuple[Any, Any]:
    """A SigLIP vision model's ``(post_layernorm, head)``; a named error where it has no head."""
    head = getattr(tower, "head", None)
    if head is None or not hasattr(head, "probe"):
        raise ConfigError(f"injector 'llava_onevision': {what} has no SigLIP attention-pooling head (vision_use_head "
                          f"is off); set backbone.params.siglip_head to a SigLIP checkpoint that has one, e.g. "
                          f"google/siglip-so400m-patch14-384.")
    return tower.post_layernorm, head


def _side(model: Any) -> int:
    vcfg = model.config.vision_config
    return vcfg.image_size // vcfg.patch_size


def _pooled_positions(model: Any, side: int) -> Tensor:
    """``[P, 2]`` (row, col) of each pooled token of one frame, in the pooled grid's units: the
    model's own ``apply_pooling`` of the patch grid's coordinates, rescaled (bilinear pooling
    of a linear ramp is the ramp at the pooled centres)."""
    r = torch.arange(side, dtype=torch.float32).repeat_interleave(side)
    c = torch.arange(side, dtype=torch.float32).repeat(side)
    grid = torch.stack([r, c], dim=1)[None]  # [1, side * side, 2]
    pooled = model.model.apply_pooling(grid.to(model.model.image_newline.dtype))[0].float().cpu()
    pooled_side = -(-side // 2)
    return (pooled + 0.5) * pooled_side / side - 0.5


def _tiles_per_image(model: Any, sizes: Tensor, batch_num_images: Any) -> list[int]:
    """The tiles ``get_image_features`` runs for each image (AnyRes only for an image alone in its
    prompt), by the model's own rule."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    if batch_num_images is None:
        patching = [True] * len(sizes)
    else:
        patching = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
    return [image_size_to_num_patches(image_size=s, grid_pinpoints=model.config.image_grid_pinpoints,
                                      patch_size=model.config.vision_config.image_size) if p else 1
            for s, p in zip(sizes, patching)]


@hookimpl
def resprune_register_injectors(register):
    register(LlavaOnevisionInjector)
