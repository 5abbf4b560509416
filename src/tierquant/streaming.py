"""Block streaming: a component of which `resident_blocks` blocks stay on the device and whose other
blocks (spread evenly among them: `plan.streamed_blocks`) are copied in from pinned host memory,
`prefetch` streamed blocks ahead of the one computing.

    streamer = BlockStreamer(transformer, torch.device("cuda"), resident_blocks=21, prefetch=2)

Each streamed block keeps its tensors whole (torchao FP8 and int8 tensors, bitsandbytes NF4 weights
with their quantization state, plain bf16), moved as a swapped component's are (`placement.Swapped`):
a pinned host copy of each tensor, a device copy made at each load. With `STAGE` on (the default), a
block that can be staged (`staging.Staged`: not NF4) keeps its tensors as views of one pinned host
buffer instead, and loading it is one copy into a slot of the component's window (`staging.Window`:
prefetch + 1 device buffers, block i in slot i mod (prefetch + 1)), after which the block holds
tensors made once over that slot. The copies
run on a side CUDA stream; a block's compute waits on the event of its own copy only, so copies of
later blocks overlap the compute of earlier ones. After its compute a block's slot is free: the side
stream first waits for that compute, so the next copy into the same memory may start at once.
(`Tensor.record_stream` would instead keep the memory out of reach until the allocator polls the
compute's event: the copies running ahead asked for new memory meanwhile, and under a hard cap the
reserved memory crept up to the cap.)

The copies happen in forward hooks at block boundaries, outside the blocks' compiled regions
(`compilation.compile_regions` compiles a streamed component's blocks' `forward`, not their
`__call__`), so streamed blocks run the same compiled code as resident ones.

A component called again and again in its phase (a denoiser, once per step) gets its next call's
first blocks sent as soon as a call's last streamed block has computed, once it has been called twice:
their copies then run behind the end of the call (the blocks after the last streamed one, and what
the pipeline does between calls) instead of in front of the next. When its phase ends,
`placement.PhaseSwitcher` releases them (`release`); so does a call that stops half-way.

On a device that is not a GPU there is no stream and no overlap: the same moves happen in order
(what the CPU tests exercise).
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from time import perf_counter

import torch
from torch import nn

from . import components as C
from .hooks import Hook, add_hook, remove_hook
from .placement import ExecutionDevice, Swapped, mark_execution_device
from .plan import streamed_blocks
from .staging import Staged, Window

HOOK = "tierquant.streaming"
# Stage streamed blocks (`staging.py`: one copy per load into a window slot) where they can be, instead
# of moving them tensor by tensor (`placement.Swapped`). On an H100 (2026-12-06, Flux.1-dev at 12 GiB,
# one run each) staging took the host's time per load from 1.5 to 0.29 ms, and the images from 3.70 s
# (steps stalling at up to 191 ms while the host fell behind) to an even 3.25 s (docs/frontier.md).
# `frontier.py`'s `tiered+per-tensor` turns it off to compare.
STAGE = True


def _moves(method):
    """A streamer method that moves tensors: never traced into a compiled region, and its host time
    counted in `host_s`."""
    @functools.wraps(method)
    def timed(self, *args):
        t0 = perf_counter()
        try:
            return method(self, *args)
        finally:
            self.host_s += perf_counter() - t0
    return torch.compiler.disable(timed)


class BlockStreamer:
    def __init__(self, module: nn.Module, dev: torch.device, resident_blocks: int | None = 0, prefetch: int = 1,
                 streamed: list[int] | None = None):
        self.module, self.dev, self.prefetch = module, dev, max(1, prefetch)
        blocks = [b for _, b in C.stream_blocks(module)]
        # The blocks that stream: those listed (a plan's `Choice.streamed`), else spread evenly.
        moving = set(streamed if streamed is not None else streamed_blocks(len(blocks), resident_blocks))
        self.resident = [b for j, b in enumerate(blocks) if j not in moving]
        going = [b for j, b in enumerate(blocks) if j in moving]
        # One copy per load into a window slot where every streamed block can be staged (not NF4).
        staged = STAGE and all(Staged.refuses(b) is None for b in going)
        self.window = Window(dev, self.prefetch + 1) if staged else None
        self.streamed = [Staged(b, self.window) if self.window else Swapped(b, dev) for b in going]
        self.cuda = dev.type == "cuda"
        self.unpinned_bytes = sum(sw.unpinned_bytes for sw in self.streamed)
        self.side = copy_stream(dev) if self.cuda else None
        self.events: dict[int, torch.cuda.Event] = {}
        self.on = 0  # streamed blocks on the device now (for tests and reports)
        self.most_on = 0  # the most at once
        # Host time spent in the moves, and blocks loaded: a benchmark reads them to tell whether the
        # host, issuing the copies, falls behind the device.
        self.host_s, self.loads = 0.0, 0
        self.calls = 0  # calls since the component's phase started (or since the last release)
        self.paused = False  # `holding`: the hooks move nothing
        self.clock: LoadClock | None = None  # a benchmark's: where the copies' time went (GPU only)
        self._handles = []
        for i, sw in enumerate(self.streamed):
            self._handles.append(sw.module.register_forward_pre_hook(lambda m, args, _i=i: self._before(_i)))
            self._handles.append(sw.module.register_forward_hook(lambda m, args, out, _i=i: self._after(_i)))
        # The first streamed blocks' copies start when the component is called, behind the resident
        # blocks before them.
        add_hook(module, HOOK, _CallStart(self), C.entry_points(module))
        mark_execution_device(module, dev)  # its inputs go to the device, whatever its first weight says

    @contextmanager
    def holding(self, block: nn.Module):
        """Within: `block`'s weights are on the device if it is a streamed block, and the streaming
        hooks leave every block alone (what `compilation.prepare` needs to export and check a block
        outside a generation: the hooks would otherwise move weights under the export's feet)."""
        sw = next((sw for sw in self.streamed if sw.module is block), None)
        moved = sw is not None and not sw.on_device
        self.paused = True
        try:
            if moved:
                sw.onload(None)
            yield
        finally:
            if moved:
                sw.offload()
            self.paused = False

    @_moves
    def start(self) -> None:
        for i in range(min(self.prefetch, len(self.streamed))):
            self._load(i)

    @_moves
    def _before(self, i: int) -> None:
        if self.paused:
            return
        self._load(i)  # not prefetched (the first call, or a block called out of order)
        if self.cuda:
            arrived = self.events.pop(i)
            if self.clock is not None:
                self.clock.waited(arrived)
            torch.cuda.current_stream(self.dev).wait_event(arrived)
        for j in range(i + 1, min(i + 1 + self.prefetch, len(self.streamed))):
            self._load(j)

    @_moves
    def _after(self, i: int) -> None:
        if self.paused:
            return
        sw = self.streamed[i]
        if self.cuda:
            # Allocated on the side stream, read by the compute stream: the side stream's later copies
            # into the same memory wait until this compute is done.
            self.side.wait_stream(torch.cuda.current_stream(self.dev))
        sw.offload()
        self.on -= 1

    def _load(self, i: int) -> None:
        sw = self.streamed[i]
        if sw.on_device:
            return
        # Block i's slot was last used by block i - (prefetch + 1), whose compute the side stream
        # waited for (`_after`); a block whose slot is still taken (called out of order) gets memory
        # of its own.
        slot = i % self.window.slots if self.window else None
        if slot is not None and any(o.on_device and o.slot == slot for o in self.streamed):
            slot = None
        if self.cuda:
            clock = self.clock
            with torch.cuda.stream(self.side):
                began = clock.began() if clock else None
                sw.onload(slot)
                self.events[i] = torch.cuda.Event(enable_timing=clock is not None)
                self.events[i].record(self.side)
                if clock:
                    clock.copied(sw.nbytes, began, self.events[i])
        else:
            sw.onload(slot)
        self.on += 1
        self.loads += 1
        self.most_on = max(self.most_on, self.on)

    @torch.compiler.disable
    def end_call(self, completed: bool) -> None:
        """After a call: send the next call's first blocks now if this component is called again and
        again (from its second call in the phase on); release everything if the call stopped half-way."""
        self.calls += 1
        if not completed or self.on:
            self.release()
        elif self.calls >= 2:
            self.start()  # the side stream already waits for this call's last streamed block

    def release(self) -> None:
        """Take every streamed block off the device: at the end of the component's phase, or after a
        call that stopped half-way."""
        if self.cuda:
            self.side.wait_stream(torch.cuda.current_stream(self.dev))
        for i, sw in enumerate(self.streamed):
            if sw.on_device:
                self.events.pop(i, None)
                sw.offload()
                self.on -= 1
        if self.window is not None:
            self.window.free()  # the side stream waited for the compute above: its pool may reuse it
        self.calls = 0

    def remove(self) -> None:
        self.release()
        for h in self._handles:
            h.remove()
        remove_hook(self.module, HOOK)
        if isinstance(vars(self.module).get("_hf_hook"), ExecutionDevice):
            del vars(self.module)["_hf_hook"]


class LoadClock:
    """Where a streamed component's copies went, for benchmarks (`streamer.clock = LoadClock()`, CUDA
    only): each load's copy time on the side stream and its bytes, and how long the compute stream
    waited for it, from reaching the block to the copy's end (the copy not hidden). Timing events
    cost a little; nothing records them unless a clock is set."""

    def __init__(self):
        self.copies: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        self.waits: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.timed: set[int] = set()  # ids of the copies' end events since the last read

    def began(self) -> torch.cuda.Event:
        e = torch.cuda.Event(enable_timing=True)
        e.record()  # on the current stream: the side stream, in `_load`
        return e

    def copied(self, nbytes: int, began: torch.cuda.Event, ended: torch.cuda.Event) -> None:
        self.copies.append((nbytes, began, ended))
        self.timed.add(id(ended))

    def waited(self, arrived: torch.cuda.Event) -> None:
        if id(arrived) not in self.timed:  # copied before the clock was set, or before the last read
            return
        reached = torch.cuda.Event(enable_timing=True)
        reached.record()  # the compute stream reaches the block
        self.waits.append((reached, arrived))

    def read(self) -> dict:
        """Totals since the last read (synchronises the device), then starts over: loads, bytes,
        the copies' GPU time, their rate (median and slowest, GB/s), and the compute stream's waits
        (total, the number of loads it waited for more than 0.1 ms, the longest)."""
        torch.cuda.synchronize()
        ms = [b.elapsed_time(e) for _, b, e in self.copies]
        rates = sorted(n / 1e6 / t for (n, _, _), t in zip(self.copies, ms) if t > 0)
        waits = [max(0.0, r.elapsed_time(a)) for r, a in self.waits]
        out = {"loads": len(ms), "bytes": sum(n for n, _, _ in self.copies), "copy_ms": round(sum(ms), 1),
               "gbps_median": round(rates[len(rates) // 2], 1) if rates else None,
               "gbps_slowest": round(rates[0], 1) if rates else None,
               "waits": len(waits), "wait_ms": round(sum(waits), 1), "waits_over_0.1ms": sum(w > 0.1 for w in waits),
               "longest_wait_ms": round(max(waits, default=0.0), 2)}
        self.copies, self.waits, self.timed = [], [], set()
        return out


_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def copy_stream(dev: torch.device) -> torch.cuda.Stream:
    """The one side stream that every streamed component on `dev` copies on. The caching allocator
    keeps a pool per stream: with a stream per component, each component's prefetch window stayed
    cached in its own pool through every later phase (the text encoder's while the transformer ran,
    the transformer's while the VAE decoded). Sharing one stream lets a later window reuse it
    (`cost.phase_peaks` counts the largest window so far as held)."""
    dev = torch.device(dev.type, torch.cuda.current_device() if dev.index is None else dev.index)
    if dev not in _COPY_STREAMS:
        _COPY_STREAMS[dev] = torch.cuda.Stream(dev)
    return _COPY_STREAMS[dev]


class _CallStart(Hook):
    def __init__(self, streamer: BlockStreamer):
        self.streamer = streamer

    def around(self, call, obj, method, args, kwargs):
        self.streamer.start()
        completed = False
        try:
            out = call(*args, **kwargs)
            completed = True
            return out
        finally:
            self.streamer.end_call(completed)
