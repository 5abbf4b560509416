"""Host memory page-locked at its exact size, for the blocks a plan copies to the GPU again and again.

torch's pinned allocator (`Tensor.pin_memory()`, `torch.empty(..., pin_memory=True)`) rounds every
request up to a power of two to reuse freed buffers: a 326 MiB Flux block would lock 512 MiB, and a plan's
host memory (`plan.host_bytes`) could be exceeded by half. A streamed or swapped block's host copy lives
as long as the plan and is never freed for reuse, so here it is plain host memory that CUDA page-locks
as it is (`cudaHostRegister`), unregistered when the last tensor over it goes.

    buf, pinned = empty(nbytes)    # uint8 host tensor; pinned False: pageable (no CUDA, or locking failed)
    host, pinned = copy(t)         # a copy of a host tensor (plain or torchao's) in such memory
    host, pinned = pin(t)          # the same, falling back to torch's pinned allocator, then pageable
"""
from __future__ import annotations

import weakref

import numpy as np
import torch

from .tensors import describe, leaves, unflatten

PAGE = 4096
PORTABLE = 1  # cudaHostRegisterPortable
# Every tensor in a buffer (`layout`) starts at a multiple of this many bytes: cuBLAS's FP8 matmuls and
# inductor's kernels expect aligned inputs, as the caching allocators give them.
ALIGN = 256

_registered = [0]  # bytes page-locked here and not yet released (`registered_bytes`)
_fallbacks: list[dict] = []  # the host copies `pin` could not lock at their exact size, and why


def registered_bytes() -> int:
    """Host bytes this module has page-locked and not released (a benchmark reports it beside the plan's)."""
    return _registered[0]


def fallbacks() -> list[dict]:
    """The tensors `pin` could not copy into exactly sized page-locked memory since the process began:
    {"shape", "dtype", "bytes", "why"} each (a benchmark reports them beside its page-locked bytes)."""
    return list(_fallbacks)


def empty(nbytes: int) -> tuple[torch.Tensor, bool]:
    """`nbytes` of uninitialised host memory as a uint8 tensor, and whether it is page-locked: it is
    when CUDA is present and can lock it; without CUDA there is nothing to lock for (True)."""
    if not torch.cuda.is_available():
        return torch.empty(nbytes, dtype=torch.uint8), True
    # Page-aligned, so that the locked range is the buffer's own pages.
    raw = np.empty(nbytes + PAGE, dtype=np.uint8)
    start = -raw.ctypes.data % PAGE
    arr = raw[start:start + nbytes]
    ptr = arr.ctypes.data
    try:
        cudart = torch.cuda.cudart()
    except (AssertionError, RuntimeError, AttributeError):  # a build without the CUDA runtime
        return _allocator_pinned(nbytes)
    # Portable: pinned for every device's context, as a plan spread over several GPUs copies to each.
    if nbytes and cudart.cudaHostRegister(ptr, nbytes, PORTABLE) != cudart.cudaError.success:
        _clear_cuda_error()
        return _allocator_pinned(nbytes)
    if nbytes:
        _registered[0] += nbytes
        # The tensor's storage holds `arr`: when the last tensor over it goes, `arr` goes, and this
        # runs before its memory is freed.
        done = weakref.finalize(arr, _unregister, cudart, ptr, nbytes)
        done.atexit = False  # at exit the CUDA context may be gone; the process's memory goes anyway
    return torch.from_numpy(arr), True


def copy(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A copy of host tensor `t` (plain, or a tensor subclass such as torchao's, through its inner
    tensors) in one `empty` buffer, and whether that is page-locked. Refuses (ValueError) a tensor
    whose plain tensors do not each fill their memory exactly (`unfit`): `pin` then falls back."""
    d = describe(t)
    flat: list[torch.Tensor] = []
    leaves(t, d, flat)
    why = unfit(flat)
    if why:
        raise ValueError(f"not copied into exact page-locked memory: {why}")
    _, _, out, locked = pack(flat)
    return unflatten(d, iter(out)), locked


def pack(flat: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple], list[torch.Tensor], bool]:
    """Copies of plain host tensors `flat` (`unfit` says None) in one `empty` buffer, as `layout` places
    them: (the buffer, their spans, the copies as views of it, whether it is page-locked)."""
    spans, nbytes = layout(flat)
    buf, locked = empty(nbytes)
    out = views(buf, spans)
    with torch.no_grad():
        for leaf, view in zip(flat, out):
            view.copy_(leaf)
    return buf, spans, out, locked


def unfit(flat: list[torch.Tensor]) -> str | None:
    """Why plain tensors `flat` cannot be laid out in one host buffer (`layout`), or None."""
    for leaf in flat:
        if leaf.device.type != "cpu":
            return f"a tensor is on {leaf.device}, not on the host"
        if not dense(leaf):
            return "a tensor has gaps or overlaps in memory (a slice, or an expanded view)"
    return None


def dense(t: torch.Tensor) -> bool:
    """Whether `t`'s elements fill a range of memory exactly once: contiguous in some order of its
    dimensions (a transposed weight is). `layout` keeps each tensor's strides, so such a tensor is
    copied as it is laid out."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def layout(flat: list[torch.Tensor]) -> tuple[list[tuple], int]:
    """Where each of the plain tensors `flat` goes in one buffer, as (start byte, shape, stride, dtype),
    each start a multiple of ALIGN; and the buffer's size, a multiple of ALIGN too."""
    spans, end = [], 0
    for leaf in flat:
        start = -(-end // ALIGN) * ALIGN
        spans.append((start, tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype))
        end = start + leaf.numel() * leaf.element_size()
    return spans, -(-end // ALIGN) * ALIGN


def views(buf: torch.Tensor, spans: list[tuple]) -> list[torch.Tensor]:
    """The tensors `layout` placed in `buf` (a uint8 buffer on any device), as views of it."""
    out = []
    for start, shape, stride, dtype in spans:
        n = torch.Size(shape).numel() * dtype.itemsize
        out.append(buf[start:start + n].view(dtype).as_strided(shape, stride))
    return out


def is_pinned(t: torch.Tensor) -> bool:
    try:
        return bool(t.is_pinned())
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def pin(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A pinned host copy of `t`, and whether it is pinned (or need not be: no CUDA). Page-locked at
    its exact size (`copy`) where its plain tensors are dense (`dense`), else through torch's pinned
    allocator (which rounds each buffer up to a power of two), else pageable."""
    t = t.to("cpu")
    if not torch.cuda.is_available() or is_pinned(t):
        return t, True
    try:
        return copy(t)
    except ValueError as e:
        _fallbacks.append({"shape": list(t.shape), "dtype": str(t.dtype), "why": str(e),
                           "bytes": int(t.numel() * t.element_size())})
    try:
        return t.pin_memory(), True
    except (RuntimeError, NotImplementedError, TypeError):
        return t, False  # tensor types without pin_memory: pageable copies, slower but correct


def _unregister(cudart, ptr: int, nbytes: int) -> None:
    cudart.cudaHostUnregister(ptr)
    _registered[0] -= nbytes


def _allocator_pinned(nbytes: int) -> tuple[torch.Tensor, bool]:
    """Where CUDA would not lock the memory as it is: torch's pinned allocator (rounded up), or
    pageable memory if that fails too (copies from it block the host until done)."""
    try:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), True
    except RuntimeError:
        return torch.empty(nbytes, dtype=torch.uint8), False


def _clear_cuda_error() -> None:
    """A failed runtime call leaves its error as the thread's last error, which torch's next kernel
    launch check would raise as its own: read it (and so reset it) where the runtime can be reached."""
    import ctypes

    try:
        ctypes.CDLL(None).cudaGetLastError()
    except (OSError, AttributeError):
        pass
