"""LLaVA-1.5 (``llava``) and LLaVA-NeXT (``llava_next``) on Hugging Face transformers."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.injection import EncodedImage, PlaceholderInjector
from resprune.params import check_choice

from .clip_attention import ClsAttentionProbe

__all__ = ["LlavaInjector", "LlavaNextInjector"]


def _feature_args(model: Any, inputs: Mapping[str, Any]) -> tuple[Any, str]:
    cfg = model.config
    layer = inputs.get("vision_feature_layer")
    strategy = inputs.get("vision_feature_select_strategy")
    return (cfg.vision_feature_layer if layer is None else layer,
            cfg.vision_feature_select_strategy if strategy is None else strategy)


def _probe(model: Any, layer: Any, need: frozenset[str]) -> Any:
    if not need & {"cls_attention", "cls_attention_layers", "vision_keys", "vision_cls"}:
        return contextlib.nullcontext()
    return ClsAttentionProbe(model.model.vision_tower, layer, every_layer="cls_attention_layers" in need,
                             keys=bool(need & {"vision_keys", "vision_cls"}))


def _projector_field(model: Any, need: frozenset[str]) -> dict[str, Any]:
    """``projector``: the model's multimodal projector as a float32 function, when asked for."""
    if "projector" not in need:
        return {}
    projector = model.model.multi_modal_projector
    dtype = next(projector.parameters()).dtype
    return {"projector": lambda features: projector(features.to(dtype)).float()}


class ProjectorInput:
    """Context manager that records what enters the multimodal projector: the vision tower's
    selected features ``[tiles, S, C]`` (CLS dropped under the ``default`` strategy)."""

    def __init__(self, model: Any) -> None:
        self.projector = model.model.multi_modal_projector
        self.features: Tensor | None = None
        self._handle: Any = None

    def _hook(self, module: Any, args: tuple[Any, ...]) -> None:
        self.features = args[0].detach()

    def __enter__(self) -> ProjectorInput:
        self._handle = self.projector.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def _cls_field(probe: Any, tile: int) -> dict[str, Tensor]:
    """``vision_cls`` of one image: the CLS output of the feature layer of its tile ``tile``."""
    cls = getattr(probe, "cls_hidden", None)
    return {} if cls is None else {"vision_cls": cls[tile]}


def _projector_input(model: Any, need: frozenset[str]) -> Any:
    return ProjectorInput(model) if "vision_features" in need else contextlib.nullcontext()


def _tile_fields(probe: Any, pre: Any, strategy: str) -> dict[str, Tensor]:
    """Per-token context fields of every tile, ``[tiles, tokens, ...]``, that were recorded."""
    fields = {}
    if getattr(pre, "features", None) is not None:
        fields["vision_features"] = pre.features
    layers = getattr(probe, "layers", None)
    if layers is not None:
        fields["cls_attention_layers"] = _patch_attention(layers, strategy).transpose(1, 2)
    keys = getattr(probe, "keys", None)
    if keys is not None:
        fields["vision_keys"] = keys[:, 1:] if strategy == "default" else keys
    return fields


def _patch_attention(att: Tensor | None, strategy: str) -> Tensor | None:
    """CLS attention ``[tiles, ..., S]`` at each tile's feature tokens (the CLS column dropped
    under the ``default`` strategy)."""
    if att is None:
        return None
    return att[..., 1:] if strategy == "default" else att


class LlavaInjector(PlaceholderInjector):
    """LLaVA-1.5: one CLIP tile per image, a square grid of patch tokens (24 x 24 at 336 px)."""

    name = "llava"
    model_types = ("llava",)
    description = "LLaVA-1.5 (LlavaForConditionalGeneration)"
    provides = PlaceholderInjector.provides | {"cls_attention", "cls_attention_layers", "vision_features",
                                               "vision_keys", "vision_cls", "projector"}

    def model_fields(self, model: Any, need: frozenset[str]) -> dict[str, Any]:
        return _projector_field(model, need)

    def encode(self, model: Any, inputs: Mapping[str, Any], need: frozenset[str]) -> list[EncodedImage]:
        layer, strategy = _feature_args(model, inputs)
        with _probe(model, layer, need) as probe, _projector_input(model, need) as pre:
            out = model.model.get_image_features(
                pixel_values=inputs["pixel_values"], vision_feature_layer=layer,
                vision_feature_select_strategy=strategy, image_sizes=inputs.get("image_sizes"), return_dict=True)
        cls = _patch_attention(getattr(probe, "attention", None), strategy)
        fields = _tile_fields(probe, pre, strategy)
        images = []
        for i, feats in enumerate(out.pooler_output):
            n = feats.shape[0]
            side = math.isqrt(n)
            grid = (side, side) if side * side == n else None
            images.append(EncodedImage(feats, grid=grid, cls_attention=None if cls is None else cls[i],
                                       extra={name: value[i].reshape(n, -1) for name, value in fields.items()},
                                       image_extra=_cls_field(probe, i),
                                       layout={"kind": "grid", "grid": grid}))
        return images


class LlavaNextInjector(PlaceholderInjector):
    """LLaVA-NeXT (AnyRes): a base tile plus high-resolution crops, with row newlines.

    The token layout is taken from the model's own ``pack_image_features``, run on a
    coordinate map instead of features, so positions, tiles and newline rows always match
    the features the model produces.
    """

    name = "llava_next"
    model_types = ("llava_next",)
    description = "LLaVA-NeXT (LlavaNextForConditionalGeneration), AnyRes tiles"
    provides = PlaceholderInjector.provides | {"cls_attention", "cls_attention_layers", "vision_features",
                                               "vision_keys", "vision_cls", "projector", "tiles"}

    def model_fields(self, model: Any, need: frozenset[str]) -> dict[str, Any]:
        return _projector_field(model, need)

    @dataclass
    class Params:
        scope: str = "global"
        """`global`: one budget over all of an image's tokens; `per_tile`: the budget is split
        over the base tile and each crop tile in proportion to their token counts."""
        image_newline: str = "candidate"
        """Newline tokens: `candidate` (compete like any token), `keep` (always kept, they
        use up budget first) or `drop` (never kept)."""

        def __post_init__(self) -> None:
            check_choice("scope", self.scope, ("global", "per_tile"))
            check_choice("image_newline", self.image_newline, ("candidate", "keep", "drop"))

    def encode(self, model: Any, inputs: Mapping[str, Any], need: frozenset[str]) -> list[EncodedImage]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        layer, strategy = _feature_args(model, inputs)
        image_sizes = inputs["image_sizes"]
        with _probe(model, layer, need) as probe, _projector_input(model, need) as pre:
            out = model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=image_sizes, vision_feature_layer=layer,
                vision_feature_select_strategy=strategy, return_dict=True)
        cls = _patch_attention(getattr(probe, "attention", None), strategy)
        vcfg = model.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        tiles_per_image = [image_size_to_num_patches(image_size=s, grid_pinpoints=model.config.image_grid_pinpoints,
                                                     patch_size=vcfg.image_size) for s in image_sizes]
        fields = {name: _packed(model, value, image_sizes, strategy, tiles_per_image)
                  for name, value in _tile_fields(probe, pre, strategy).items()}
        maps = _layout_maps(model, image_sizes, tiles_per_image, side, strategy, cls)
        images = []
        for i, feats in enumerate(out.pooler_output):
            packed = maps[i]
            if packed.shape[0] != feats.shape[0]:
                raise RuntimeError(f"LLaVA-NeXT layout has {packed.shape[0]} tokens but the model gave "
                                   f"{feats.shape[0]} for image {i}")
            images.append(self._image(feats, packed, side, tuple(int(x) for x in image_sizes[i]),
                                      {name: value[i] for name, value in fields.items()},
                                      _cls_field(probe, sum(tiles_per_image[:i]))))  # the base image's tile
        return images

    def _image(self, feats: Tensor, packed: Tensor, side: int, size: tuple[int, int],
               extra: dict[str, Tensor], image_extra: dict[str, Tensor]) -> EncodedImage:
        tile, row, col, att = packed.unbind(-1)
        newline = torch.isnan(tile)
        base = tile == 0
        crop = ~newline & ~base
        positions = torch.full((feats.shape[0], 2), float("nan"))
        positions[base, 0], positions[base, 1] = row[base], col[base]
        crop_grid = None
        crop_rc = torch.full((feats.shape[0], 2), float("nan"))
        if bool(crop.any()):
            r, c = row[crop], col[crop]  # global rows/cols of the (padded) crop grid
            r0, c0 = r.min(), c.min()
            h, w = r.max() - r0 + 1, c.max() - c0 + 1
            crop_grid = (int(h), int(w))
            crop_rc[crop, 0], crop_rc[crop, 1] = r - r0, c - c0
            positions[crop, 0] = (r - r0 + 0.5) / h * side - 0.5  # image-relative, base-grid units
            positions[crop, 1] = (c - c0 + 0.5) / w * side - 0.5
        # a newline belongs to the tile of the token before it (the end of its row)
        groups = torch.where(newline, torch.zeros_like(tile), tile)
        for j in newline.nonzero().squeeze(1).tolist():
            groups[j] = groups[j - 1] if j else 0
        policy = self.params.image_newline
        return EncodedImage(
            feats,
            grid=(side, side) if not bool(crop.any()) and not bool(newline.any()) else None,
            positions=positions,
            cls_attention=None if torch.isnan(att).all() else torch.nan_to_num(att, nan=0.0),
            tiles=torch.where(newline, -1.0, tile).long(),
            extra=extra,
            image_extra=image_extra,
            candidates=~newline if policy == "drop" else None,
            always=newline if policy == "keep" else None,
            groups=groups.long() if self.params.scope == "per_tile" else None,
            layout={"kind": "anyres", "base_grid": (side, side), "crop_grid": crop_grid, "image_size": size,
                    "newline": newline, "tile": groups.long(), "crop_rc": crop_rc,
                    "tile_cell": torch.where(newline, -1.0, (row % side) * side + col % side).long()},
        )


def _packed(model: Any, tiles: Tensor, image_sizes: Tensor, strategy: str, counts: list[int]) -> list[Tensor]:
    """Per image ``[N, C]``: per-token values of every tile ``[tiles, S, C]`` (``counts`` tiles per
    image) packed like the projected features (the model's own unpadding and row newlines; zeros
    at newline tokens)."""
    packed, _ = model.model.pack_image_features(list(tiles.split(counts)), image_sizes,
                                                vision_feature_select_strategy=strategy,
                                                image_newline=tiles.new_zeros(tiles.shape[-1]))
    return list(packed)


def _layout_maps(model: Any, image_sizes: Tensor, tiles_per_image: list[int], side: int, strategy: str,
                 cls: Tensor | None) -> list[Tensor]:
    """Per image ``[N, 4]``: (tile, global row, global col, CLS attention) of each packed token.

    Crop tiles are numbered 1.. in raster order; their rows/cols are positions in the padded
    crop grid (unpadding removes some); newline rows are NaN.
    """
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    per_image = []
    start = 0
    r = torch.arange(side, dtype=torch.float32).repeat_interleave(side)
    c = torch.arange(side, dtype=torch.float32).repeat(side)
    for i, tiles in enumerate(tiles_per_image):
        coords = torch.zeros(tiles, side * side, 4)
        att = cls[start: start + tiles].float().cpu() if cls is not None else torch.full((tiles, side * side), float("nan"))
        start += tiles
        if tiles > 1:
            nph, npw = get_anyres_image_grid_shape(image_sizes[i], model.config.image_grid_pinpoints,
                                                   model.config.vision_config.image_size)
        for t in range(tiles):
            coords[t, :, 0] = t
            if t == 0:
                coords[t, :, 1], coords[t, :, 2] = r, c
            else:
                th, tw = divmod(t - 1, npw)
                coords[t, :, 1], coords[t, :, 2] = th * side + r, tw * side + c
            coords[t, :, 3] = att[t, -side * side:]
        per_image.append(coords)
    packed, _ = model.model.pack_image_features(per_image, image_sizes, vision_feature_select_strategy=strategy,
                                                image_newline=torch.full((4,), float("nan")))
    return [p.float().cpu() for p in packed]


@hookimpl
def resprune_register_injectors(register):
    register(LlavaInjector)
    register(LlavaNextInjector)
