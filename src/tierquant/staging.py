"""A streamed block's tensors in one pinned host buffer, copied whole into a slot of its window.

Moving a block tensor by tensor (`placement.Swapped`) costs, at every load, a `.to()` of each of its
tensors (through Python dispatch for torchao's subclasses) and new device memory: on an H100 the host
spent 1.2-2.6 ms per streamed block load (docs/frontier.md). Staged, a block's tensors are views of
one pinned host buffer, and a load is one copy into a slot of the component's `Window` (prefetch + 1
device buffers, each the size of its largest block, made at the first load of its phase and given
back when the phase ends). The block then holds tensors made over views of that slot: made once per
block and slot while the window lives, not at every load.

    window = Window(dev, slots=2)
    staged = [Staged(b, window) for b in blocks]       # where Staged.refuses(b) is None
    staged[i].onload(i % window.slots)                 # one copy; the block holds the slot's tensors
    staged[i].offload()                                # the block holds its host tensors again
    window.free()                                      # the phase is over: the slots' memory goes back

Bitsandbytes' NF4 weights keep their quantization state outside the tensor: those blocks move tensor
by tensor as before (`Staged.refuses`).
"""
from __future__ import annotations

import torch
from torch import nn

from . import pinned
from .tensors import describe, held_tensors, is_bnb, leaves, unflatten


class Window:
    """A streamed component's device memory for its blocks in flight: `slots` buffers of `nbytes`."""

    def __init__(self, dev: torch.device, slots: int):
        self.dev, self.slots = dev, slots
        self.nbytes = 0  # each slot's size: the largest staged block's
        self.members: list[Staged] = []
        self.buffers: list[torch.Tensor] | None = None

    def buffer(self, k: int) -> torch.Tensor:
        """Slot k's memory, made on the current stream (the copy stream, in `streaming`) when first asked."""
        if self.buffers is None:
            self.buffers = [torch.empty(self.nbytes, dtype=torch.uint8, device=self.dev) for _ in range(self.slots)]
        return self.buffers[k]

    def free(self) -> None:
        """Give the slots' memory back, and the tensors made over it."""
        for st in self.members:
            st.made.clear()
        self.buffers = None


class Staged:
    """One block whose tensors are views of one pinned host buffer (see the module's docstring)."""

    def __init__(self, module: nn.Module, window: Window):
        self.module, self.window, self.dev = module, window, window.dev
        held = held_tensors(module)
        originals = [t for t, _ in held]
        self.holders = [places for _, places in held]  # per distinct tensor, where it is held (ties stay tied)
        self.descs = [describe(t) for t in originals]
        self.params = [isinstance(t, nn.Parameter) for t in originals]
        flat: list[torch.Tensor] = []
        for t, d in zip(originals, self.descs):
            leaves(t, d, flat)
        # Page-locked at its exact size (torch's pinned allocator would round it up to a power of two).
        self.host_buffer, self.spans, _, locked = pinned.pack(flat)
        self.nbytes = self.host_buffer.numel()
        self.unpinned_bytes = 0 if locked else sum(leaf.numel() * leaf.element_size() for leaf in flat)
        self.host = self._make(self.host_buffer)
        self._put(self.host)  # the block's own host tensors go: it holds views of the buffer now
        self.made: dict[int, list[torch.Tensor]] = {}  # slot -> the tensors made over it
        self.on_device, self.slot = False, None
        window.nbytes = max(window.nbytes, self.nbytes)
        window.members.append(self)

    @staticmethod
    def refuses(module: nn.Module) -> str | None:
        """None where `module`'s tensors can be staged, else why not."""
        for t in list(module.parameters()) + list(module.buffers()):
            if is_bnb(t):
                return "bitsandbytes weights keep their quantization state beside the tensor"
            flat: list[torch.Tensor] = []
            leaves(t, describe(t), flat)
            why = pinned.unfit(flat)
            if why:
                return why
        return None

    def _make(self, buf: torch.Tensor) -> list[torch.Tensor]:
        it = iter(pinned.views(buf, self.spans))
        made = [unflatten(d, it) for d in self.descs]
        return [nn.Parameter(t, requires_grad=False) if p and not isinstance(t, nn.Parameter) else t
                for t, p in zip(made, self.params)]

    def _put(self, tensors: list[torch.Tensor]) -> None:
        for t, places in zip(tensors, self.holders):
            for store, key in places:
                store[key] = t

    def onload(self, slot: int | None) -> None:
        """Copy the block into `slot` of its window (None: into memory of its own, for a load outside
        the window's order) and let it hold the device tensors. Asynchronous from pinned memory."""
        if self.on_device:
            return
        buf = self.window.buffer(slot) if slot is not None else \
            torch.empty(self.nbytes, dtype=torch.uint8, device=self.dev)
        buf[:self.nbytes].copy_(self.host_buffer, non_blocking=True)
        tensors = self.made.get(slot) if slot is not None else None
        if tensors is None:
            tensors = self._make(buf)
            if slot is not None:
                self.made[slot] = tensors
        self._put(tensors)
        self.on_device, self.slot = True, slot

    def offload(self) -> None:
        """The block holds its host tensors again; its slot is free once its compute is done."""
        if self.on_device:
            self._put(self.host)
            self.on_device, self.slot = False, None

