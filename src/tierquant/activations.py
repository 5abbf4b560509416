"""Activation memory as a knob: tiled decoding for VAEs that support it.

A VAE decoding a 1024x1024 image holds ~2.4 GiB of activations at its peak (Flux's, docs/measurements.md):
at small budgets that is more than the transformer blocks it displaces. diffusers' tiled decoding
decodes overlapping tiles one at a time, so the peak follows one tile's area instead of the image's;
the overlap costs extra work. The planner weighs both (`ComponentProfile.tiled_*`, from `tiling_facts`
when profiling), and the applier turns it on (`enable_tiling`) where the plan says `tiled`.

The other half of the knob, emptying the allocator's cache when a phase starts, lives with the phase
switch (`placement.PhaseSwitcher`).
"""
from __future__ import annotations

import inspect
import math

from torch import nn

# Tiles of 512x512 pixels: a quarter of a 1024x1024 image's area, so about a quarter of its decode
# activations; diffusers' own default tile for AutoencoderKL is the model's sample size (1024 for
# Flux and SD3), which does not tile a 1024x1024 image at all.
TILE_PX = 512
OVERLAP = 0.25  # AutoencoderKL's tile_overlap_factor: tiles start every 3/4 of a tile


def _knobs(module: nn.Module) -> str | None:
    """How `module`'s tile size is set: "sample_size" (AutoencoderKL's attributes), "height_width"
    (enable_tiling's keyword arguments, as Wan's and Qwen-Image's VAEs take them), or None."""
    enable = getattr(module, "enable_tiling", None)
    if not callable(enable):
        return None
    try:
        params = inspect.signature(enable).parameters
    except (TypeError, ValueError):
        return None
    if "tile_sample_min_height" in params and "tile_sample_min_width" in params:
        return "height_width"
    if hasattr(module, "tile_sample_min_size") and hasattr(module, "tile_latent_min_size"):
        return "sample_size"
    return None


def _span(length: int, tile: int, stride: int) -> int:
    """Pixels decoded along one side, overlaps counted again (tiles start every `stride`)."""
    return sum(min(tile, length - p) for p in range(0, length, stride))


def tiling_facts(module: nn.Module, height: int | None, width: int | None) -> tuple[float, float] | None:
    """(share of the decode's activation peak left with tiles, work done relative to one pass) for
    an image of height x width, or None where `module` cannot tile or the image is one tile anyway.
    An estimate from areas: the activations of a convolutional decoder scale with its input's area
    (its mid-block attention even faster), and every tile is decoded whole."""
    if _knobs(module) is None or not height or not width or max(height, width) <= TILE_PX:
        return None
    stride = int(TILE_PX * (1 - OVERLAP))
    tile_area = min(TILE_PX, height) * min(TILE_PX, width)
    work = _span(height, TILE_PX, stride) * _span(width, TILE_PX, stride) / (height * width)
    return tile_area / (height * width), work


def enable_tiling(module: nn.Module) -> None:
    """Decode in tiles of TILE_PX pixels with diffusers' own tiled decoding."""
    how = _knobs(module)
    stride = int(TILE_PX * (1 - OVERLAP))
    if how == "height_width":
        params = inspect.signature(module.enable_tiling).parameters
        kw = {"tile_sample_min_height": TILE_PX, "tile_sample_min_width": TILE_PX,
              "tile_sample_stride_height": stride, "tile_sample_stride_width": stride}
        module.enable_tiling(**{k: v for k, v in kw.items() if k in params})
        return
    if how != "sample_size":
        raise ValueError(f"{type(module).__name__} cannot decode in tiles")
    module.enable_tiling()
    # AutoencoderKL decodes latent tiles of tile_latent_min_size into tile_sample_min_size pixels.
    scale = module.tile_sample_min_size / max(module.tile_latent_min_size, 1)
    module.tile_sample_min_size = TILE_PX
    module.tile_latent_min_size = max(1, int(math.floor(TILE_PX / scale)))
    module.tile_overlap_factor = OVERLAP
