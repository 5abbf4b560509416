"""Moving and measuring a module's tensors, quantized ones included.

Three kinds of tensor live in an applied pipeline: plain tensors; torchao tensor subclasses (an
outer tensor over inner data and scales); bitsandbytes' Params4bit (packed data plus a
`quant_state` on the side). Each moves and counts differently, and this is the one place that knows.
"""
from __future__ import annotations

import torch
from torch import nn


def is_plain(t: torch.Tensor) -> bool:
    return type(t) in (nn.Parameter, torch.Tensor)


def is_bnb(t) -> bool:
    return type(t).__name__ == "Params4bit"


def nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: a torchao tensor's inner tensors, a bitsandbytes weight's packed data
    and absmax, a plain tensor's elements."""
    if hasattr(t, "__tensor_flatten__") and not is_plain(t):
        names, _ = t.__tensor_flatten__()
        return sum(nbytes(getattr(t, n)) for n in names)
    qs = getattr(t, "quant_state", None)
    extra = qs.absmax.numel() * qs.absmax.element_size() if getattr(qs, "absmax", None) is not None else 0
    return t.numel() * t.element_size() + extra


def module_bytes(module: nn.Module, recurse: bool = True, as_bf16: bool = False) -> int:
    """Bytes of a module's tensors, each counted once: as they are, or (as_bf16) with plain floating
    tensors counted in bf16 (what moving them to the device in bf16 brings there)."""
    seen, total = set(), 0
    for t in list(module.parameters(recurse=recurse)) + list(module.buffers(recurse=recurse)):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * 2 if as_bf16 and t.is_floating_point() and is_plain(t) else nbytes(t)
    return total


def move_tensors(owner: nn.Module, device: torch.device, dtype: torch.dtype | None, non_blocking=False) -> None:
    """Move (and cast floating plain tensors to `dtype`) the tensors `owner` holds directly."""
    for store in (owner._parameters, owner._buffers):
        for key, t in store.items():
            if t is None:
                continue
            if is_plain(t):
                cast = dtype if (dtype is not None and t.is_floating_point()) else None
                if t.device != device or (cast is not None and t.dtype != cast):
                    t.data = t.data.to(device=device, dtype=cast, non_blocking=non_blocking)
            elif t.device != device:
                # Quantized tensor subclasses: their own .to knows their inner tensors (torchao) or
                # quantization state (bitsandbytes); `.data =` would move the wrapper only.
                store[key] = as_param_like(t, t.to(device, non_blocking=non_blocking))


def as_param_like(like: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if isinstance(like, nn.Parameter) and not isinstance(t, nn.Parameter):
        return nn.Parameter(t, requires_grad=False)
    return t


# -- a tensor as plain leaves and back (tensor subclasses through __tensor_flatten__) ---------------
def describe(t: torch.Tensor):
    """What `leaves` and `unflatten` need to take `t` apart and make it again: for a tensor subclass
    (torchao's), its type, flatten context, outer size and stride and its inner tensors' descriptions;
    for a plain tensor, its shape, dtype and stride."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, ctx = t.__tensor_flatten__()
        return ("sub", type(t), tuple(names), ctx, tuple(t.size()), tuple(t.stride()),
                tuple(describe(getattr(t, n)) for n in names))
    # Not the device: the same description serves a tensor's host and device copies.
    return ("leaf", tuple(t.shape), str(t.dtype), tuple(t.stride()))


def leaves(t, d, out: list) -> None:
    """Append `t`'s plain tensors (described by `d`) to `out`, depth first."""
    if d[0] == "leaf":
        out.append(t)
        return
    for n, sub in zip(d[2], d[6]):
        leaves(getattr(t, n), sub, out)


def unflatten(d, it):
    """The tensor `d` describes, made from plain tensors taken from the iterator `it` in `leaves` order."""
    if d[0] == "leaf":
        return next(it)
    _, cls, names, ctx, size, stride, subs = d
    inner = {n: unflatten(s, it) for n, s in zip(names, subs)}
    return cls.__tensor_unflatten__(inner, ctx, size, stride)


def held_tensors(module: nn.Module) -> list[list]:
    """Each distinct tensor `module` holds, with every (store, key) that holds it, as [tensor, [(store,
    key), ...]] in module order: putting a new tensor in all of its places keeps tied tensors tied."""
    found: dict[int, list] = {}
    for m in module.modules():
        for store in (m._parameters, m._buffers):
            for key, t in store.items():
                if t is not None:
                    found.setdefault(id(t), [t, []])[1].append((store, key))
    return list(found.values())
