"""Placements: where a component's weights live between and during its calls.

- resident: on the device all the time (nothing to do here).
- swapped: a pinned host copy; on the device only during its own phase. A phase starts when one of
  its components' entry points is called (a hook); the other phases' swapped components leave first.
- streamed: block by block from the host at every call, part of the blocks resident (`streaming.py`).
"""
from __future__ import annotations

import warnings
from collections import deque

import torch
from torch import nn

from . import components as C
from .hooks import Hook, add_hook, remove_hook
from .plan import Plan
from .pinned import pin
from .tensors import as_param_like, held_tensors, is_bnb, is_plain, nbytes

HOOK = "tierquant.placement"


class Swapped:
    """One swapped component: a pinned host copy of each tensor, and a device copy while it is on.

    Moving replaces the tensor objects the modules hold (in every module that holds one: tied weights
    stay tied) instead of swapping `.data`: that works for torchao's tensor subclasses too, and going
    off the device needs no copy at all, since the host copy never changed.
    """

    def __init__(self, module: nn.Module, dev: torch.device):
        self.module, self.dev, self.on_device = module, dev, False
        self.slots: list[list] = held_tensors(module)  # [host tensor, [(store, key), ...]]
        # Host bytes that could not be pinned: copying them to a GPU blocks the host until the copy is
        # done, so the host stops running ahead of the device (`pin` falls back for tensor types it
        # cannot copy into page-locked memory, and when locking fails).
        self.unpinned_bytes = 0
        for slot in self.slots:
            t = slot[0]
            if is_plain(t) or is_bnb(t):
                t.data, locked = pin(t.data)  # keeps the object (and bitsandbytes' quant_state on it)
            else:
                host, locked = pin(t)
                slot[0] = as_param_like(t, host)
                self._put(slot, slot[0])
            self.unpinned_bytes += 0 if locked else nbytes(slot[0])
        self.nbytes = sum(nbytes(slot[0]) for slot in self.slots)  # what a load copies

    @staticmethod
    def _put(slot, t) -> None:
        for store, key in slot[1]:
            store[key] = t

    def onload(self, slot: int | None = None) -> None:
        """Copy every tensor to the device (`slot`: a window's, which moving tensor by tensor has none of)."""
        if self.on_device:
            return
        for slot in self.slots:
            host = slot[0]
            # Params4bit.to also moves its quant_state, in place.
            self._put(slot, as_param_like(host, host.to(self.dev, non_blocking=True)))
        self.on_device = True

    def offload(self) -> None:
        if not self.on_device:
            return
        for slot in self.slots:
            host = slot[0]
            self._put(slot, host)
            if is_bnb(host) and host.quant_state is not None:
                host.quant_state.to("cpu")  # shared with the device copy, which moved it
        self.on_device = False


class UnpinnedWarning(UserWarning):
    """Some host copies that a plan moves to a GPU at every call could not be pinned."""


def note_unpinned(record: dict, streamers: dict, switcher: "PhaseSwitcher | None") -> None:
    """Record in each component's `record` entry the host bytes it moves that could not be pinned, and
    warn once if there are any: their copies block the host, which then stops running ahead of the GPU,
    so the plan runs slower than it predicts."""
    moving = {n: st.unpinned_bytes for n, st in streamers.items()}
    if switcher is not None:
        moving.update({n: sw.unpinned_bytes for n, sw in switcher.swapped.items()})
    moving = {n: b for n, b in moving.items() if b}
    for n, b in moving.items():
        record.setdefault(n, {})["unpinned_bytes"] = b
    if moving:
        what = ", ".join(f"{n} {b / 2**30:.2f} GiB" for n, b in moving.items())
        warnings.warn(UnpinnedWarning(
            f"host copies that could not be pinned ({what}): their copies to the GPU block the host, so this "
            f"plan may run slower than predicted. Pinning needs page-locked host memory (ulimit -l, free RAM)."),
            stacklevel=3)


class ExecutionDevice:
    """Where a component computes, told to diffusers the way offloading hooks tell it.

    diffusers (0.42) moves a component's inputs to `get_module_execution_device(component)` before
    calling it (Flux: the latents before `vae.decode`, the token ids before each text encoder). For a
    component waiting on the host that is the host, unless a hook says otherwise: an `_hf_hook` with an
    `execution_device`, as accelerate's offloading hooks have. This object is only that attribute (no
    pre_forward: nothing else treats it as a hook). Found on an H100 (2026-11-26): a swapped VAE got
    its latents on the CPU."""

    def __init__(self, dev: torch.device):
        self.execution_device = dev

    def detach_hook(self, module):  # accelerate's remove_hook_from_module calls this before deleting it
        return module


def mark_execution_device(module: nn.Module, dev: torch.device) -> None:
    if getattr(module, "_hf_hook", None) is None:
        vars(module)["_hf_hook"] = ExecutionDevice(dev)


class PhaseSwitcher:
    """Moves swapped components on when their phase starts and off when another phase starts, and
    releases streamed components' blocks (`streaming.BlockStreamer.release`) when their phase ends.

    A phase starts when any of its components' entry points (forward, decode, ...) is called.
    With `free_cache`, the caching allocator's free blocks go back to the device then too: the new
    phase's activations (of other sizes) could not reuse most of them, and the plan did not count them.
    """

    def __init__(self, pipe, plan: Plan, comps: dict, swapped: set, dev: torch.device, free_cache: bool = False,
                 streamers: dict | None = None):
        self.free_cache = free_cache
        self.streamers = dict(streamers or {})
        self.phase_of: dict[str, int] = {}
        for i, ph in enumerate(plan.phases or []):
            for n in ph.get("components", []):
                self.phase_of.setdefault(n, i)
        extra = len(plan.phases or [])
        for n in comps:
            if n not in self.phase_of:
                self.phase_of[n] = extra
                extra += 1
        devs = dev if isinstance(dev, dict) else dict.fromkeys(comps, dev)  # a dict: each component's card
        self.swapped = {n: Swapped(comps[n], devs[n]) for n in comps if n in swapped}
        self.current: int | None = None
        self.calls: deque[str] = deque(maxlen=64)  # the latest phase switches, for tests and reports
        self.modules = list(comps.values())
        for n in self.swapped:
            mark_execution_device(comps[n], devs[n])
        for name, module in comps.items():
            # Outside every other hook and any offloading wrapper installed before: a phase's switch
            # (the last phase's blocks released, the cache emptied) happens before anything else of
            # the call, a streamer's first copies included; they would otherwise need the memory the
            # last phase still held (an H100, 2026-12-06: a staged window ran out of memory so).
            add_hook(module, HOOK, _EnterPhase(self, name), C.entry_points(module), outer=True)

    @torch.compiler.disable  # moves tensors: never traced into a compiled region
    def enter(self, name: str) -> None:
        phase = self.phase_of[name]
        if phase == self.current:
            return
        # Free the device before filling it: the other phase's components go first.
        for n, st in self.streamers.items():
            if self.phase_of[n] != phase:
                st.release()
        for n, sw in self.swapped.items():
            if self.phase_of[n] != phase:
                sw.offload()
        if self.free_cache:
            torch.cuda.empty_cache()
        for n, sw in self.swapped.items():
            if self.phase_of[n] == phase:
                sw.onload()
        self.current = phase
        self.calls.append(name)

    def remove(self) -> None:
        for module in self.modules:
            remove_hook(module, HOOK)
            if isinstance(vars(module).get("_hf_hook"), ExecutionDevice):
                del vars(module)["_hf_hook"]


class _EnterPhase(Hook):
    def __init__(self, switcher: PhaseSwitcher, name: str):
        self.switcher, self.name = switcher, name

    def pre_call(self, obj, method, args, kwargs):
        self.switcher.enter(self.name)
        return args, kwargs


def pin_execution_device(pipe, dev: torch.device) -> None:
    # With every component off the device between its calls, diffusers would infer "cpu" as the
    # execution device and make latents there. A subclass of the pipeline's own class says where.
    cls = type(pipe)
    pipe.__class__ = type(cls.__name__, (cls,), {"_execution_device": property(lambda self: dev),
                                                 "__module__": cls.__module__})
