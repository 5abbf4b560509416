"""Measured sensitivity: how much each scheme changes each component's output, on real inputs.

Inputs are captured from one real generation (the first call of each component), then each
component is quantized alone, on a copy, and run again on the same inputs. The error is
1 - cosine similarity of the main output, averaged over its feature vectors (tokens, pixels):
scale-free, and the same measure as the priors in schemes.py (docs/measurements.md). The planner reads it from
`Profile.sensitivity`.
"""
from __future__ import annotations

import copy
from contextlib import ExitStack

import torch

from .backends import quantize
from .components import discover, entry_points, quantizable_layers
from .hooks import Hook, add_hook, remove_hook
from .schemes import BASELINE, CATALOG

HOOK = "tierquant.sensitivity"


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for x in out:
            t = _first_tensor(x)
            if t is not None:
                return t
    for name in ("sample", "last_hidden_state", "latent_dist"):
        if hasattr(out, name):
            return _first_tensor(getattr(out, name))
    return None


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


class _Capture(Hook):
    """Keeps the first outermost call of one component: (method, args, kwargs)."""

    def __init__(self, name: str, seen: dict):
        self.name, self.seen, self.depth = name, seen, 0

    def around(self, call, obj, method, args, kwargs):
        if self.depth == 0 and self.name not in self.seen:
            self.seen[self.name] = (method, _clone(args), _clone(kwargs))
        self.depth += 1
        try:
            return call(*args, **kwargs)
        finally:
            self.depth -= 1


def capture_inputs(pipe, **call_kwargs) -> dict[str, tuple[str, tuple, dict]]:
    """The first call of each component during one generation: (method, args, kwargs). Other hooks
    on the components (an applied plan's placements) stay in place."""
    comps = discover(pipe)
    seen: dict[str, tuple[str, tuple, dict]] = {}
    with ExitStack() as stack:
        for name, module in comps.items():
            add_hook(module, HOOK, _Capture(name, seen), entry_points(module))
            stack.callback(remove_hook, module, HOOK)
        with torch.no_grad():
            pipe(**call_kwargs)
    return seen


def cosine_error(ref: torch.Tensor, out: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """1 - mean cosine between matching feature vectors (last dimension, or channels for images).

    `mask` (a text encoder's attention mask) leaves padding positions out: nothing downstream
    attends to them, and their embeddings swing with any change."""
    ref, out = ref.float(), out.float()
    dim = 1 if ref.dim() == 4 else -1  # NCHW images: compare per-pixel channel vectors
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=dim, eps=1e-8)
    if mask is not None and mask.shape == cos.shape:
        w = mask.to(cos.dtype)
        return float(1 - (cos * w).sum() / w.sum().clamp(min=1))
    return float(1 - cos.mean())


@torch.no_grad()
def measure(pipe, schemes: list[str] | None = None, components: list[str] | None = None,
            **call_kwargs) -> dict[str, dict[str, float]]:
    """{component: {scheme: error}} for every runnable scheme (bf16 counts as 0 by definition)."""
    from .hardware import detect

    comps = discover(pipe)
    # The schemes that run where the components are: a pipeline held on the CPU of a GPU machine
    # measures CPU kernels (FP8's per-row `_scaled_mm` has none there).
    on = {p.device.type for m in comps.values() for p in m.parameters()}
    hw = detect("cuda" if "cuda" in on else "cpu")
    schemes = [s for s in (schemes or list(CATALOG)) if s != BASELINE and not CATALOG[s].available_on(hw)]
    inputs = capture_inputs(pipe, **call_kwargs)
    out: dict[str, dict[str, float]] = {}
    for name, (method, args, kwargs) in inputs.items():
        if components and name not in components:
            continue
        module = comps[name]
        ref = _first_tensor(getattr(module, method)(*args, **kwargs))
        if ref is None or not any(k is None for _, _, k in quantizable_layers(module)):
            continue
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) else None
        out[name] = {BASELINE: 0.0}
        for s in schemes:
            twin = copy.deepcopy(module)
            quantize(twin, s)
            got = _first_tensor(getattr(twin, method)(*args, **kwargs))
            out[name][s] = cosine_error(ref, got, mask)
            del twin
    return out
