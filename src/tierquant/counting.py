"""Counting what a call costs without timing it: FLOPs (torch's FlopCounterMode, plus the fused CPU
attention it does not know) and the peak bytes of the storages the call creates (any device, meta too)."""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # torch's flop registry knows the CUDA attention kernels but not the fused CPU one.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    extra = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    return FlopCounterMode(display=False, custom_mapping=extra)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created while active and still alive; `peak` is their maximum.

    Works on any device, meta included (storages there have sizes but no memory). Views and
    in-place results share a storage and count once; a finalizer on each storage subtracts it
    when it dies.
    """

    def __init__(self, transient: Callable[[Any, tuple, Any], int] | None = None):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = WeakIdKeyDictionary()
        self._transient = transient  # (op, args, out) -> bytes an op holds only while it runs

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # An output on an input's storage (a view of a weight, an in-place or out= result) is no
        # new memory: only storages the op allocated count.
        inputs = {st._cdata for st in map(_storage, tree_flatten((args, kwargs))[0]) if st is not None}
        for st in map(_storage, tree_flatten(out)[0]):
            if st is None or st._cdata in inputs or st in self._seen:
                continue
            n = st.nbytes()
            self._seen[st] = n
            weakref.finalize(st, self._free, n)
            self.live += n
            self.peak = max(self.peak, self.live)
        if self._transient is not None:
            self.peak = max(self.peak, self.live + self._transient(func, args, out))
        return out


def _storage(t):
    if not isinstance(t, torch.Tensor):
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return None
