"""InternVL3 (``internvl``) on Hugging Face transformers.

An image is cut into up to 12 tiles of 448 px on the grid whose aspect ratio is closest to the
image's (``rows x cols``, in raster order), followed by a thumbnail of the whole image when there
is more than one tile; a single-tile image has no thumbnail. InternViT encodes each tile (a CLS
token and 32 x 32 patches), the pixel shuffle folds each 2 x 2 group of patches into one token
(256 a tile) and the projector maps them into the LLM. In the prompt an image is one run of
``256 x tiles`` context tokens between ``<img>`` and ``</img>``: the run length gives its tile
count (the processor does not pass it on).

The crop grid is not in the model inputs either; the injector finds it among the grids of that
many tiles as the one whose crops, put side by side and shrunk to a tile, look most like the
thumbnail. Positions are then image-relative like LLaVA-NeXT's: the thumbnail's tokens on its
16 x 16 grid, each crop's at its place in the crop grid scaled to the same units. ``tiles``
numbers the thumbnail 0 and the crops 1.. in raster order. By default each tile gets its share of
the image's budget (``scope: per_tile``: equal shares, since every tile has 256 tokens);
``scope: global`` spends one budget over the whole image (then e.g. HiRED shares it by CLS
attention). ``cls_attention`` is the CLS row of the attention of the InternViT layer the features
come from (``vision_feature_layer``), averaged over heads, summed over the 4 patches the pixel
shuffle folds into a token; ``cls_attention_layers`` the same at every layer (HiRED's early layer);
``vision_features`` the pixel-shuffled InternViT features entering the projector. Positions in the LLM are contiguous (1-D RoPE), as for LLaVA.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from resprune import hookimpl
from resprune.errors import InvalidInputError
from resprune.injection import EncodedImage, PlaceholderInjector
from resprune.params import check_choice

from .clip_attention import ClsAttentionProbe
from .llava import ProjectorInput

__all__ = ["InternVLInjector", "crop_grid"]


def crop_grid(tiles: Tensor) -> tuple[int, int]:
    """``(rows, cols)`` of an image's crops ``tiles[:-1]`` (``[n, C, H, W]``, raster order, the
    thumbnail last): of the grids of ``n - 1`` tiles, the one whose crops put side by side and
    shrunk to one tile (area average) are closest to the thumbnail (mean squared difference)."""
    crops, thumbnail = tiles[:-1].float(), tiles[-1].float()
    n, channels, height, width = crops.shape
    best, best_error = (1, n), float("inf")
    for rows in range(1, n + 1):
        if n % rows:
            continue
        cols = n // rows
        mosaic = crops.view(rows, cols, channels, height, width).permute(2, 0, 3, 1, 4)
        mosaic = mosaic.reshape(1, channels, rows * height, cols * width)
        error = float((F.adaptive_avg_pool2d(mosaic, (height, width))[0] - thumbnail).pow(2).mean())
        if error < best_error:
            best, best_error = (rows, cols), error
    return best


def _runs(inputs: Mapping[str, Any], token: int) -> list[int]:
    """Lengths of the runs of ``token`` in the prompts, row by row (padding excluded)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    present = ids == token
    if mask is not None:
        present &= mask.bool()
    out = []
    for row in present.tolist():
        count = 0
        for here in row + [False]:
            if here:
                count += 1
            elif count:
                out.append(count)
                count = 0
    return out


def _token_attention(model: Any, attention: Tensor, strategy: str) -> Tensor:
    """CLS attention ``[tiles, S]`` (CLS column first) at each LLM token ``[tiles, S']``: the sum over
    the patches the model's own pixel shuffle folds into it (run on a map of patch indices)."""
    patches = attention[:, 1:] if strategy == "default" else attention
    tiles, count = patches.shape
    side = math.isqrt(count)
    index = torch.arange(count, dtype=torch.float32).view(1, side, side, 1)
    folded = model.model.pixel_shuffle(index, scale_factor=model.config.downsample_ratio)  # [1, s, s, 4]
    folded = folded.reshape(-1, folded.shape[-1]).long().to(patches.device)
    return patches.float()[:, folded].sum(-1)  # [tiles, S']


class InternVLInjector(PlaceholderInjector):
    """InternVL3: pixel-shuffled InternViT tiles (a crop grid and a thumbnail) per image."""

    name = "internvl"
    model_types = ("internvl",)
    provides = PlaceholderInjector.provides | {"cls_attention", "cls_attention_layers", "tiles", "vision_features"}
    description = ("InternVL3 (InternVLForConditionalGeneration): 256 pixel-shuffled tokens a tile, crops and a "
                   "thumbnail, InternViT CLS attention")
    vision_inputs = ("pixel_values", "vision_feature_layer", "vision_feature_select_strategy")
    vision_refusal = (" (its pixel shuffle folds every 2x2 group of patches into one token, so no layer of it can "
                      "drop a patch: allowed vision layers: none)")

    @dataclass
    class Params:
        scope: str = "per_tile"
        """`per_tile`: the budget is split over the thumbnail and each crop in proportion to their
        token counts (equal shares); `global`: one budget over all of an image's tokens."""

        def __post_init__(self) -> None:
            check_choice("scope", self.scope, ("global", "per_tile"))

    def encode(self, model: Any, inputs: Mapping[str, Any], need: frozenset[str], **kwargs: Any) -> list[EncodedImage]:
        cfg = model.config
        layer = inputs.get("vision_feature_layer")
        layer = cfg.vision_feature_layer if layer is None else layer
        strategy = inputs.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        pixels = inputs["pixel_values"]
        tower = model.model.vision_tower
        probe = ClsAttentionProbe(tower, layer, every_layer="cls_attention_layers" in need, layers=tower.encoder.layer,
                                  attention="attention", query="q_norm", key="k_norm") \
            if need & {"cls_attention", "cls_attention_layers"} else contextlib.nullcontext()
        with probe, contextlib.ExitStack() as stack:
            pre = stack.enter_context(ProjectorInput(model)) if "vision_features" in need else None
            features = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=layer,
                                                      vision_feature_select_strategy=strategy,
                                                      return_dict=True).pooler_output  # [tiles, S', D]
        per_tile = features.shape[1]
        runs = _runs(inputs, self.image_token_id(model))
        if any(run % per_tile for run in runs) or sum(runs) != features.shape[0] * per_tile:
            raise InvalidInputError(
                f"injector '{self.name}': the prompts' image runs hold {runs} context tokens, but the "
                f"{features.shape[0]} tile(s) of pixel_values give {per_tile} tokens each; each image needs "
                f"{per_tile} tokens per tile. Use the processor that matches the model.")
        attention = None if getattr(probe, "attention", None) is None else \
            _token_attention(model, probe.attention, strategy)
        every = None
        if "cls_attention_layers" in need:  # [tiles, S', layers]
            every = torch.stack([_token_attention(model, probe.rows[i], strategy) for i in sorted(probe.rows)], -1)
        side = math.isqrt(per_tile)
        images, start = [], 0
        for run in runs:
            tiles = run // per_tile
            span = slice(start, start + tiles)
            image = self._image(features[span].reshape(run, -1), pixels[span], side,
                                None if attention is None else attention[span].reshape(-1))
            if every is not None:
                image.extra["cls_attention_layers"] = every[span].reshape(run, -1)
            if pre is not None:  # the pixel-shuffled InternViT features entering the projector
                image.extra["vision_features"] = pre.features[span].reshape(run, -1)
            images.append(image)
            start += tiles
        return images

    def _image(self, feats: Tensor, pixels: Tensor, side: int, cls: Tensor | None) -> EncodedImage:
        tiles = pixels.shape[0]
        r = torch.arange(side, dtype=torch.float32).repeat_interleave(side)
        c = torch.arange(side, dtype=torch.float32).repeat(side)
        if tiles == 1:
            return EncodedImage(feats, grid=(side, side), cls_attention=cls,
                                tiles=torch.zeros(side * side, dtype=torch.long),
                                layout={"kind": "grid", "grid": (side, side), "tiles": 1})
        rows, cols = crop_grid(pixels)
        crops = tiles - 1
        t = torch.arange(crops).repeat_interleave(side * side)  # the crop of each crop token, raster order
        crop_rc = torch.full((feats.shape[0], 2), float("nan"))  # row, col in the crop grid's tokens
        crop_rc[: t.numel(), 0] = (t // cols * side).float() + r.repeat(crops)
        crop_rc[: t.numel(), 1] = (t % cols * side).float() + c.repeat(crops)
        scale = torch.tensor([rows * side, cols * side], dtype=torch.float32)
        positions = torch.cat([(crop_rc[: t.numel()] + 0.5) / scale * side - 0.5,  # crops, in thumbnail units
                               torch.stack([r, c], dim=1)])  # the thumbnail
        tile = torch.cat([t + 1, torch.zeros(side * side, dtype=torch.long)])
        # drawn like LLaVA-NeXT's AnyRes (resprune.visualize): the thumbnail as the base view, then the crops
        return EncodedImage(feats, positions=positions, cls_attention=cls, tiles=tile,
                            groups=tile if self.params.scope == "per_tile" else None,
                            layout={"kind": "anyres", "base_grid": (side, side), "crop_grid": (rows * side, cols * side),
                                    "tiles": tiles, "tile": tile, "crop_rc": crop_rc,
                                    "newline": torch.zeros(feats.shape[0], dtype=torch.bool)})


@hookimpl
def resprune_register_injectors(register):
    register(InternVLInjector)
