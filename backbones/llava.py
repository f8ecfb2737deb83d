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

from .clip_attention import ClsAttentionProbe, LastLayerProbe
from .vision_stages import VISION_FIELDS, TowerStages, vision_layers

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


def _model_fields(model: Any, need: frozenset[str]) -> dict[str, Any]:
    """``projector`` (the multimodal projector) and ``vision_post_norm`` (the tower's final
    layer norm) as float32 functions, when asked for."""
    out: dict[str, Any] = {}
    if "projector" in need:
        projector = model.model.multi_modal_projector
        dtype = next(projector.parameters()).dtype
        out["projector"] = lambda features: projector(features.to(dtype)).float()
    if "clip_checkpoint" in need:
        from resprune.clip_text import clip_checkpoint_of

        out["clip_checkpoint"] = clip_checkpoint_of(model.config.vision_config)
    if "vision_post_norm" in need:
        norm = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower).post_layernorm
        out["vision_post_norm"] = lambda features: norm(features.to(norm.weight.dtype)).float()
    return out


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


def _last_layer(model: Any, need: frozenset[str]) -> Any:
    if not need & {"last_keys", "last_cls_attention"}:
        return contextlib.nullcontext()
    return LastLayerProbe(model.model.vision_tower)


class Tower:
    """The vision tower call of one ``encode``: its stages (if any), and what it ran on."""

    def __init__(self, model: Any, layer: Any, strategy: str, stages: Any) -> None:
        self.depth = len(vision_layers(model.model.vision_tower))
        vcfg = model.config.vision_config
        self.length = (vcfg.image_size // vcfg.patch_size) ** 2 + 1  # CLS + patches per tile
        self.stages = None
        if stages:
            layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
            self.stages = TowerStages(model.model.vision_tower, model.model.multi_modal_projector, stages, layers,
                                      strategy, source="vision tower")

    def __enter__(self) -> Tower:
        if self.stages is not None:
            self.stages.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stages is not None:
            self.stages.__exit__(*exc)

    @property
    def schedule(self) -> list[tuple[int, int]]:
        """``(first encoder layer, tokens per tile)``."""
        if self.stages is None or not self.stages.schedule:
            return [(0, self.length)]
        tiles = self.stages.schedule[0][1] // self.length
        return [(layer, count // tiles) for layer, count in self.stages.schedule]

    def masks(self) -> list[Tensor]:
        """Bool ``[tiles, S']`` per stage: the projector's tokens still there after it."""
        return [] if self.stages is None else self.stages.masks

    def expand(self, values: Tensor | None, layer: int, *, projected: bool = False) -> Tensor | None:
        if values is None or self.stages is None:
            return values
        return self.stages.expand(values, layer, projected=projected)


def _tile_fields(probe: Any, pre: Any, strategy: str, tower: Tower, last: Any = None) -> dict[str, Tensor]:
    """Per-token context fields of every tile, ``[tiles, tokens, ...]``, that were recorded."""
    fields = {}
    if getattr(last, "keys", None) is not None:  # the last layer runs on hidden_states[depth - 1]
        keys = tower.expand(last.keys, last.layer)
        attention = tower.expand(last.attention, last.layer)
        fields["last_keys"] = keys[:, 1:] if strategy == "default" else keys
        fields["last_cls_attention"] = (attention[:, 1:] if strategy == "default" else attention)[..., None]
    if getattr(pre, "features", None) is not None:
        fields["vision_features"] = tower.expand(pre.features, tower.depth, projected=True)
    if getattr(probe, "rows", None) and len(probe.modules) > 1:
        rows = [tower.expand(probe.rows[i], i) for i in sorted(probe.rows)]
        fields["cls_attention_layers"] = _patch_attention(torch.stack(rows, dim=1), strategy).transpose(1, 2)
    keys = tower.expand(getattr(probe, "keys", None), getattr(probe, "feature_layer", 0))
    if keys is not None:
        fields["vision_keys"] = keys[:, 1:] if strategy == "default" else keys
    return fields


def _cls_attention(probe: Any, strategy: str, tower: Tower) -> Tensor | None:
    """CLS attention at the feature layer's tokens, ``[tiles, S']`` (zeros at pruned tokens)."""
    if getattr(probe, "attention", None) is None:
        return None
    return _patch_attention(tower.expand(probe.attention, probe.feature_layer), strategy)


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
                                               "vision_keys", "vision_cls", "projector", "vision_post_norm",
                                               "clip_checkpoint", "last_keys", "last_cls_attention"}
    vision_provides = VISION_FIELDS

    def model_fields(self, model: Any, need: frozenset[str]) -> dict[str, Any]:
        return _model_fields(model, need)

    def encode(self, model: Any, inputs: Mapping[str, Any], need: frozenset[str], *,
               vision_stages: Any = ()) -> list[EncodedImage]:
        layer, strategy = _feature_args(model, inputs)
        with _probe(model, layer, need) as probe, _projector_input(model, need) as pre, \
                _last_layer(model, need) as last, Tower(model, layer, strategy, vision_stages) as tower:
            out = model.model.get_image_features(
                pixel_values=inputs["pixel_values"], vision_feature_layer=layer,
                vision_feature_select_strategy=strategy, image_sizes=inputs.get("image_sizes"), return_dict=True)
        cls = _cls_attention(probe, strategy, tower)
        fields = _tile_fields(probe, pre, strategy, tower, last)
        masks = tower.masks()
        images = []
        for i, feats in enumerate(out.pooler_output):
            n = feats.shape[0]
            side = math.isqrt(n)
            grid = (side, side) if side * side == n else None
            images.append(EncodedImage(feats, grid=grid, cls_attention=None if cls is None else cls[i],
                                       extra={name: value[i].reshape(n, -1) for name, value in fields.items()},
                                       image_extra=_cls_field(probe, i),
                                       layout={"kind": "grid", "grid": grid},
                                       vision_masks=[mask[i].cpu() for mask in masks],
                                       tower_schedule=tower.schedule, tower_tiles=1))
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
                                               "vision_keys", "vision_cls", "projector", "vision_post_norm",
                                               "clip_checkpoint", "last_keys", "last_cls_attention", "tiles"}
    vision_provides = VISION_FIELDS

    def model_fields(self, model: Any, need: frozenset[str]) -> dict[str, Any]:
        return _model_fields(model, need)

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

    def encode(self, model: Any, inputs: Mapping[str, Any], need: frozenset[str], *,
               vision_stages: Any = ()) -> list[EncodedImage]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        layer, strategy = _feature_args(model, inputs)
        image_sizes = inputs["image_sizes"]
        with _probe(model, layer, need) as probe, _projector_input(model, need) as pre, \
                _last_layer(model, need) as last, Tower(model, layer, strategy, vision_stages) as tower:
            out = model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=image_sizes, vision_feature_layer=layer,
                vision_feature_select_strategy=strategy, return_dict=True)
        cls = _cls_attention(probe, strategy, tower)
        vcfg = model.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        tiles_per_image = [image_size_to_num_patches(image_size=s, grid_pinpoints=model.config.image_grid_pinpoints,
                                                     patch_size=vcfg.image_size) for s in image_sizes]
        fields = {name: _packed(model, value, image_sizes, strategy, tiles_per_image)
                  for name, value in _tile_fields(probe, pre, strategy, tower, last).items()}
        masks = [[m.squeeze(-1).bool().cpu() for m in _packed(model, mask.unsqueeze(-1).float(), image_sizes, strategy,
                                                               tiles_per_image, newline=1.0)]
                 for mask in tower.masks()]  # per stage, per image: the packed tokens still there
        maps = _layout_maps(model, image_sizes, tiles_per_image, side, strategy, cls)
        images = []
        for i, feats in enumerate(out.pooler_output):
            packed = maps[i]
            if packed.shape[0] != feats.shape[0]:
                raise RuntimeError(f"LLaVA-NeXT layout has {packed.shape[0]} tokens but the model gave "
                                   f"{feats.shape[0]} for image {i}")
            image = self._image(feats, packed, side, tuple(int(x) for x in image_sizes[i]),
                                {name: value[i] for name, value in fields.items()},
                                _cls_field(probe, sum(tiles_per_image[:i])))  # the base image's tile
            image.vision_masks = [per_image[i] for per_image in masks]
            image.tower_schedule, image.tower_tiles = tower.schedule, tiles_per_image[i]
            images.append(image)
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


def _packed(model: Any, tiles: Tensor, image_sizes: Tensor, strategy: str, counts: list[int],
            newline: float = 0.0) -> list[Tensor]:
    """Per image ``[N, C]``: per-token values of every tile ``[tiles, S, C]`` (``counts`` tiles per
    image) packed like the projected features (the model's own unpadding and row newlines;
    ``newline`` at newline tokens)."""
    packed, _ = model.model.pack_image_features(list(tiles.split(counts)), image_sizes,
                                                vision_feature_select_strategy=strategy,
                                                image_newline=tiles.new_full((tiles.shape[-1],), newline))
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
