"""Activation memory as a knob: tiled decoding for VAEs that support it.

A VAE decoding a 1024x1024 image holds ~2.4 GiB of activations at its peak (Flux's, docs/measurements.md):
at small budgets that is more than the transformer blocks it displaces. diffusers' tiled decoding
decodes overlapping tiles one at a time, so the peak follows one tile's area instead of the image's;
the overlap costs extra work. The planner weighs both (`ComponentProfile.tiled_*`, from `tiling_facts`
when profiling), and the applier turns it on (`enable_tiling`) where the plan says `tiled`.

diffusers blends each tile into its neighbours row by row in a Python loop (`blend_v`, `blend_h`:
four small kernels per row of the overlap, ~6,000 launches for a 1024x1024 image in 512-pixel tiles).
On an H100 (2026-12-06) that made Flux's tiled decode host-bound: the host spent ~270 ms in a decode
whose GPU work is ~145 ms, and the GPU waited. `enable_tiling` therefore also puts `FastBlend` on the
VAE: the same arithmetic, rounded the same way, in one step per blend, where a probe shows the two
agree exactly.

The other half of the knob, emptying the allocator's cache when a phase starts, lives with the phase
switch (`placement.PhaseSwitcher`).
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from .hooks import Hook, HookRegistry, add_hook

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
    """Decode in tiles of TILE_PX pixels with diffusers' own tiled decoding, blending the tiles in
    one step (`FastBlend`) where that gives the same pixels."""
    _set_tiles(module)
    ranks = {m: blends_alike(module, m) for m in FastBlend.DIMS}
    ranks = {m: r for m, r in ranks.items() if r}
    if ranks and BLEND_HOOK not in (HookRegistry.get(module) or ()):
        add_hook(module, BLEND_HOOK, FastBlend(ranks), list(ranks))


def _set_tiles(module: nn.Module) -> None:
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


# -- the tiles' blend --------------------------------------------------------------------------
BLEND_HOOK = "tierquant.tile-blend"


def blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """diffusers' `blend_v` (dim -2) / `blend_h` (dim -1) in one step: the first `extent` rows of `b`
    along `dim` fade in over the last `extent` of `a`, in place, and `b` is returned.

    Rounded as the loop rounds: each row's weights are Python floats (y / extent, 1 - y / extent),
    which a kernel takes in its compute type (float32 for bf16, fp16 and fp32 tensors); each product
    is rounded to `b`'s dtype, and so is their sum."""
    e = min(a.shape[dim], b.shape[dim], extent)
    if e <= 0:
        return b
    compute = torch.promote_types(b.dtype, torch.float32)
    y = torch.arange(e, dtype=torch.float64)
    shape = [1] * b.dim()
    shape[dim] = e
    fade_in = (y / e).to(device=b.device, dtype=compute).view(shape)
    fade_out = (1 - y / e).to(device=b.device, dtype=compute).view(shape)
    head = b.narrow(dim, 0, e)
    head.copy_((a.narrow(dim, a.shape[dim] - e, e) * fade_out).to(b.dtype) + (head * fade_in).to(b.dtype))
    return b


class FastBlend(Hook):
    """A VAE's `blend_v` / `blend_h`, done by `blend` instead of the row-by-row loop, for the tensor
    ranks where a probe found the two alike (`ranks`: method -> ranks); anything else goes to the
    VAE's own."""

    DIMS = {"blend_v": -2, "blend_h": -1}

    def __init__(self, ranks: dict[str, set[int]]):
        self.ranks = ranks

    def around(self, call, obj, method, args, kwargs):
        if len(args) == 3 and not kwargs:
            a, b, extent = args
            if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and isinstance(extent, int)
                    and a.dim() == b.dim() and b.dim() in self.ranks.get(method, ())):
                return blend(a, b, extent, self.DIMS[method])
        return call(*args, **kwargs)


PROBES = ((1, 2, 6, 7), (1, 2, 2, 6, 7))  # image tiles (B, C, H, W), video tiles (B, C, T, H, W)


def blends_alike(module: nn.Module, method: str) -> set[int]:
    """The tensor ranks (4: image tiles, 5: video tiles) at which `module`'s own `method` ("blend_v"
    or "blend_h") and `blend` give the same tensor, bit for bit, on a probe in the module's dtype: a
    VAE whose blend works otherwise, or at a rank it refuses, keeps its own there."""
    own = getattr(type(module), method, None)
    if not callable(own):
        return set()
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    g = torch.Generator().manual_seed(0)
    alike = set()
    for shape in PROBES:
        a = torch.randn(shape, generator=g).to(dtype)
        b = torch.randn(shape, generator=g).to(dtype)
        try:
            with torch.no_grad():
                want = own(module, a.clone(), b.clone(), 4)
        except Exception:  # noqa: BLE001 - not at this rank (or not a blend at all)
            continue
        with torch.no_grad():
            got = blend(a.clone(), b.clone(), 4, FastBlend.DIMS[method])
        if isinstance(want, torch.Tensor) and want.shape == got.shape and torch.equal(want, got):
            alike.add(len(shape))
    return alike
