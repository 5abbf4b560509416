"""The cost model: what one option (scheme x placement x compile) of a component costs in seconds per
generation and in device bytes, on a given card. Pure: plain data in, numbers out.

Per call: a roofline (matmul work at the scheme's rate and efficiency, the rest at bf16, never
faster than one pass over weights and activations, nor than a GPU's host issues its layers), or
measured times where `calibrate.py` provides them. Per generation: calls x per-call time, plus
host-to-device copies for placements that keep weights on the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .errors import TierquantError
from .hardware import Hardware
from .plan import PLACEMENTS, streamed_blocks
from .profile import ComponentProfile, Profile
from .schemes import BASELINE, CATALOG, COMPILED_OVERHEAD_S, Scheme

# What the caching allocator reserves beyond the model's count of live bytes: a small share of it,
# plus the phase's largest activation peak (activations of many sizes are what the pool cannot
# reuse exactly; weights and streamed blocks come back in the same sizes). Measured on H100s
# (2026-11-26, docs/planner.md): the allocated peak was 0.90-1.004x the count, and what was reserved
# beyond the allocated followed the peak phase's largest activation (0.4-2.1 GiB) in 7 runs of
# flux-dev and SD3.5-large. The earlier fixed 10% + 1 GiB left 13-18% of the small budgets unused.
ALLOCATOR_MARGIN = 0.03
# Block streaming: copies run on a side stream while earlier blocks compute; each streamed block
# also costs a host-side wait and hand-over (an event, the tensor swap). About 95% of an FP8 block
# copy hid behind FP8 compute on an H200 (docs/measurements.md); the rest is this overhead's and the
# first block's, which no compute hides.
STREAM_BLOCK_OVERHEAD_S = 20e-6
# A later process, with torch's compile artifacts and inductor's cache from an earlier one, compiled
# in this share of the cold time: on an H100 (2026-11-26, afea47b) a second process's first image took
# 6.6 s more than its steady images against 24.7 s in a cold first process (Flux at 24 GiB), and 3.4 s
# against 19.8 s (SD3.5-large), shares 0.27 and 0.17 (benchmarks/results/h100/user-path.json).
WARM_COMPILE_SHARE = 0.2
# How many residency levels the planner tries between "all blocks streamed" and "all resident".
RESIDENCY_LEVELS = 16
# Emptying the allocator's cache when a phase starts (torch.cuda.empty_cache, then fresh cudaMallocs
# for the new phase's activations): an assumed cost per phase and generation, a few milliseconds
# against seconds of denoising. It stops earlier phases' cached activations from counting later.
EMPTY_CACHE_S = 0.005


@dataclass(frozen=True)
class Option:
    component: str
    scheme: str
    placement: str
    compile: bool
    call_seconds: float  # one call, on the device
    seconds: float  # per generation: calls x call_seconds + transfers
    weight_bytes: int  # on the device while placed there (streamed: the whole, though only a window is there)
    resident_bytes: int  # counted in every phase
    phase_bytes: int  # counted in its own phase only
    error: float
    resident_blocks: int | None = None  # streamed: how many of its blocks stay on the device
    prefetch: int = 1  # streamed: how many blocks are copied ahead of the one computing
    host_bytes: int = 0  # pinned host copies it needs (swapped: all; streamed: the streamed blocks)
    compile_s: float = 0.0  # compiling it from a cold cache, once per process (0: not compiled)
    activation_bytes: int = 0  # its activation peak during a call (above its weights)
    tiled: bool = False  # decodes in tiles (activations.py): a smaller activation peak, more work
    streamed: tuple[int, ...] | None = None  # streamed: which blocks stream (None: spread evenly by count)


# -- time --------------------------------------------------------------------------------

def weight_bytes(c: ComponentProfile, s: Scheme) -> int:
    """Bytes of `c`'s weights under `s`: quantized Linear weights plus everything else in bf16
    (layers the scheme cannot pack, `Scheme.packs`, stay bf16 too)."""
    quantizable = sum(l.params for l in _quantized(c, s))
    return bytes_under(c.params, quantizable, s, rows_per_param(c, s))


def bytes_under(params: int, quantizable: int, s: Scheme, rows_per_param: float = 0.0) -> int:
    """Bytes of `params` parameters of which `quantizable` are in Linear layers `s` quantizes, those
    layers having `rows_per_param` output rows per weight (each row has its own scale)."""
    return int((params - quantizable) * 2 + quantizable * (s.bytes_per_param + rows_per_param * s.bytes_per_row))


def rows_per_param(c: ComponentProfile, s: Scheme) -> float:
    """Output rows per weight of the Linear layers `s` quantizes in `c`: what a part of it (a block)
    carries in scales, by the component's mix of layer shapes."""
    layers = _quantized(c, s)
    return sum(l.out_features for l in layers) / max(sum(l.params for l in layers), 1)


def _quantized(c: ComponentProfile, s: Scheme) -> list:
    return [l for l in c.layers if l.keep is None and s.packs(l.in_features, l.out_features) is None]


def roofline_call_seconds(c: ComponentProfile, s: Scheme, compiled: bool, hw: Hardware) -> float:
    """One call of `c` under `s` on `hw`: matmul work at the scheme's rate, the rest at bf16,
    never faster than one pass over its weights and activations, nor than the host can issue its
    layers (on a GPU: the host runs ahead of the GPU, so the longer of the two bounds the call; a
    CPU is its own host, its dispatch part of the measured efficiency)."""
    t_compute = compute_seconds(c.flops_per_call, c.linear_flops_per_call, s, compiled, hw)
    t_memory = (weight_bytes(c, s) + c.activation_peak_bytes) / hw.bandwidth
    t_host = 0.0
    if hw.device == "cuda":
        t_host = len(c.layers) * (COMPILED_OVERHEAD_S if compiled else s.eager_overhead_s)
    return max(t_compute, t_memory, t_host)


def math_rate(s: Scheme, hw: Hardware) -> float:
    """The peak rate `hw` runs `s`'s matmuls at (its tensor cores for `s.math`; bf16's where it has none)."""
    return {"bf16": hw.bf16_flops, "fp8": hw.fp8_flops, "int8": hw.int8_ops}[s.math] or hw.bf16_flops


def compute_seconds(flops: float, linear: float, s: Scheme, compiled: bool, hw: Hardware) -> float:
    """`flops` of work of which `linear` in Linear layers: those at the scheme's rate, the rest at
    bf16's, each at its fitted efficiency."""
    rate = math_rate(s, hw)
    base = CATALOG[BASELINE]
    eff = s.efficiency_compiled if compiled else s.efficiency_eager
    base_eff = base.efficiency_compiled if compiled else base.efficiency_eager
    linear = min(linear, flops)
    return linear / (rate * eff) + (flops - linear) / (hw.bf16_flops * base_eff)


def bf16_seconds(c: ComponentProfile, hw: Hardware, timings: dict | None) -> float:
    if timings and (c.name, BASELINE, False) in timings:
        return c.calls * timings[(c.name, BASELINE, False)]
    return c.calls * roofline_call_seconds(c, CATALOG[BASELINE], False, hw)


def expected_error(c: ComponentProfile, s: Scheme, sensitivity: dict) -> float:
    measured = sensitivity.get(c.name, {}).get(s.name)
    return float(measured) if measured is not None else s.error_prior


def options_for(c: ComponentProfile, hw: Hardware, catalog: dict[str, Scheme], sensitivity: dict,
                timings: dict | None, critical: bool = True) -> list[Option]:
    out = []
    placements = ("resident",) if hw.device == "cpu" else PLACEMENTS
    for s in catalog.values():
        if s.available_on(hw):
            continue
        w = weight_bytes(c, s)
        err = expected_error(c, s, sensitivity)
        for placement in placements:
            if placement != "resident" and not s.composes_with_offload:
                continue
            if c.calls == 0 and placement != "swapped" and hw.device != "cpu":
                continue  # never called: it can wait on the host
            # Regional compilation pays its compile time (minutes, for FP8) back only in a
            # speed-critical component, called at every step. Streamed blocks run the same compiled
            # code: their copies happen at block boundaries, outside the compiled regions.
            compiles = [False]
            if hw.device == "cuda" and critical and s.composes_with_compile and c.calls > 1 and c.repeated_blocks:
                compiles.append(True)
            for compiled in compiles:
                key = (c.name, s.name, compiled)
                t = timings[key] if timings and key in timings else roofline_call_seconds(c, s, compiled, hw)
                if placement == "resident":
                    out.append(Option(c.name, s.name, placement, compiled, t, c.calls * t, w, w, 0, err))
                elif placement == "swapped":
                    # In once per generation from a pinned host copy; dropping it again is free.
                    secs = c.calls * t + (w / hw.host_link if c.calls else 0.0)
                    out.append(Option(c.name, s.name, placement, compiled, t, secs, w, 0, w, err, host_bytes=w))
                else:
                    out += streamed_options(c, s, compiled, t, hw, err)
    out = [replace(o, compile_s=compile_seconds(c, catalog[o.scheme]) if o.compile else 0.0,
                   activation_bytes=c.activation_peak_bytes) for o in out]
    return out + tiled_options(c, out)


def tiled_options(c: ComponentProfile, opts: list[Option]) -> list[Option]:
    """Each option again with tiled decoding, where the component can tile: the activation peak of
    one tile, and the overlapping tiles' extra work on top of the call's compute."""
    if c.tiled_activation_peak_bytes is None or c.tiled_activation_peak_bytes >= c.activation_peak_bytes:
        return []
    extra = c.calls * (c.tiled_work - 1.0)
    return [replace(o, tiled=True, activation_bytes=c.tiled_activation_peak_bytes,
                    seconds=o.seconds + extra * o.call_seconds) for o in opts]


def compile_seconds(c: ComponentProfile, s: Scheme) -> float:
    """Compiling `c`'s blocks under `s` from a cold cache: once per block class, not per block."""
    return (s.compile_s or 0.0) * max(1, len(c.repeated_blocks))


def blocks_of(c: ComponentProfile) -> list[list[int]]:
    """The component's blocks as [params, quantizable params]. Profiles from before per-block sizes
    (version 1) only know the largest block: they are read as equal blocks of that size."""
    if c.blocks:
        return c.blocks
    if not (c.repeated_blocks and c.largest_block_bytes):
        return []
    n = max(1, round(c.weight_bytes / c.largest_block_bytes))
    return [[c.params // n, c.quantizable_params // n]] * n


def residency_levels(n: int) -> list[int]:
    """Numbers of resident blocks to try: 0 (all streamed) up to n - 1 (all resident is `resident`)."""
    return sorted({round(i * n / RESIDENCY_LEVELS) for i in range(RESIDENCY_LEVELS)} - {n})


def streamed_options(c: ComponentProfile, s: Scheme, compiled: bool, t: float, hw: Hardware,
                     err: float) -> list[Option]:
    """Block streaming with k blocks resident, for each residency level k: the others (spread evenly,
    `plan.streamed_blocks`) are copied from pinned host memory `prefetch` streamed blocks ahead of the
    one computing."""
    blocks = blocks_of(c)
    if not blocks:
        return []
    w = weight_bytes(c, s)
    rows = rows_per_param(c, s)
    sizes = [bytes_under(p, q, s, rows) for p, q in blocks]
    # Each block's share of the call (`block_shares`); what runs outside the blocks (embeddings, the
    # last projection) adds its share after them.
    compute = [t * share for share in block_shares(c, s, compiled, hw)]
    outside = max(t - sum(compute), 0.0)
    out = []
    for k in residency_levels(len(sizes)):
        even = streamed_blocks(len(sizes), k)
        # The same bytes spread by compute (`spread_by_compute`): where blocks differ in bytes per
        # FLOP, as Flux's double and single blocks do, the even spread puts the copy-heavy ones
        # together, and there the compute waits while elsewhere the link idles.
        by_compute = spread_by_compute(compute, [b / hw.host_link for b in sizes], sum(sizes[j] for j in even) / hw.host_link)
        for listed, chosen in ((None, even), (tuple(by_compute), by_compute)):
            if listed is not None and (by_compute == even or not by_compute):
                continue
            moving = set(chosen)
            for prefetch in (1, 2):
                copies = [b / hw.host_link if j in moving else 0.0 for j, b in enumerate(sizes)]
                seconds = (stream_calls_seconds(compute, copies, prefetch, outside, c.calls)
                           + c.calls * len(moving) * STREAM_BLOCK_OVERHEAD_S)
                window = (prefetch + 1) * max(sizes[j] for j in moving)  # the block computing and those arriving
                streamed = sum(sizes[j] for j in moving)
                out.append(Option(c.name, s.name, "streamed", compiled, t, seconds, w, w - streamed,
                                  window, err, resident_blocks=len(sizes) - len(moving), prefetch=prefetch,
                                  host_bytes=streamed, streamed=listed))
    return out


def spread_by_compute(compute: list[float], copy: list[float], total: float) -> list[int]:
    """Blocks to stream (indices, in call order) so that about `total` seconds of copies are spread
    over a call in proportion to its compute: walking the blocks, a block streams while the copies
    chosen so far are behind their share of the compute done so far (`copy[j]`: block j's copy).
    Equal blocks come out evenly spread; blocks with more bytes per FLOP stream less often."""
    work = sum(compute)
    if work <= 0 or total <= 0:
        return []
    rate, done, copied, out = total / work, 0.0, 0.0, []
    for j, (t, x) in enumerate(zip(compute, copy)):
        done += t
        if copied + x / 2 <= rate * done:
            out.append(j)
            copied += x
    return out


def block_shares(c: ComponentProfile, s: Scheme, compiled: bool, hw: Hardware) -> list[float]:
    """Each block's share of one call of `c` under `s`: by its FLOPs where the profile has them
    (`ComponentProfile.block_flops`), priced as the whole call is (`compute_seconds`); else by its
    parameters."""
    blocks = blocks_of(c)
    if len(c.block_flops) != len(blocks) or c.flops_per_call <= 0:
        return [p / max(c.params, 1) for p, _ in blocks]
    whole = compute_seconds(c.flops_per_call, c.linear_flops_per_call, s, compiled, hw)
    if whole <= 0:
        return [0.0] * len(blocks)
    shares = [compute_seconds(f, lin, s, compiled, hw) / whole for f, lin in c.block_flops]
    # The blocks are part of the call: never more than all of it (a component whose entry points
    # count differently, weighted by how often each is called).
    return [x / max(sum(shares), 1.0) for x in shares]


def stream_call_seconds(compute: list[float], copies: list[float], prefetch: int) -> float:
    """One call through blocks in order, each needing `compute[j]` seconds after its weights arrive
    (`copies[j]` seconds over the host link, 0 for a resident block). One copy at a time; a copy may
    start once the block `prefetch + 1` places before it has finished computing (its room is free)."""
    return _timeline(compute, copies, prefetch, 0.0, 1)[0]


def stream_calls_seconds(compute: list[float], copies: list[float], prefetch: int, outside: float,
                         calls: int) -> float:
    """`calls` calls back to back, each its blocks then `outside` seconds of other compute. From the
    third call on, the first `prefetch` copies were sent when the previous call's last streamed block
    had computed (`streaming.BlockStreamer` carries them over once a component has been called twice
    in its phase), so they run behind that call's tail. The steady call is the third of three
    simulated; the rest repeat it."""
    if calls <= 0:
        return 0.0
    ends = _timeline(compute, copies, prefetch, outside, min(calls, 3))
    if calls <= 3:
        return ends[calls - 1]
    return ends[2] + (calls - 3) * (ends[2] - ends[1])


def _timeline(compute: list[float], copies: list[float], prefetch: int, outside: float, calls: int) -> list[float]:
    """When each of `calls` back-to-back calls ends (see stream_calls_seconds)."""
    done: list[float] = []  # compute end of every block of every call so far
    streamed: list[int] = []  # indices into `done` of the streamed blocks: they share the window
    link = start = 0.0
    ends = []
    for c in range(calls):
        carried_room = done[streamed[-1]] if c >= 2 and streamed else None
        in_call = 0  # streamed blocks of this call so far
        now = start  # when the compute stream is free
        for t, x in zip(compute, copies):
            ready = 0.0
            if x:
                m = len(streamed)
                if in_call < prefetch:  # sent at the call's start, or carried over from the last call
                    room = carried_room if carried_room is not None else start
                else:
                    room = done[streamed[m - prefetch - 1]] if m - prefetch - 1 >= 0 else start
                link = max(link, room) + x
                ready = link
                streamed.append(len(done))
                in_call += 1
            now = max(now, ready) + t
            done.append(now)
        start = now + outside
        ends.append(start)
    return ends


# -- memory ------------------------------------------------------------------------------------

def activation(profile: Profile, chosen: dict[str, Option], name: str) -> int:
    o = chosen.get(name)
    return o.activation_bytes if o is not None else profile.components[name].activation_peak_bytes


def phase_peaks(profile: Profile, chosen: dict[str, Option], free: bool = False) -> list[int]:
    """Device bytes in each phase (before the allocator's margin), and a last entry for applying:
    components are quantized block by block, so at most one block of bf16 is there extra.

    A phase holds resident weights, its own swapped / streamed weights, its activation peak, and,
    unless `free` (the cache is emptied when a phase starts), what the caching allocator kept from
    earlier phases: their activations (a later phase's tensors of other sizes cannot reuse them),
    and the largest prefetch window streamed so far (every streamed component copies on one side
    stream, `streaming.copy_stream`, whose pool keeps the blocks a window used; a later window
    reuses them, so only the largest counts)."""
    return [raw for raw, _ in _phases(profile, chosen, free)]


def reserved_peak(profile: Profile, chosen: dict[str, Option], free: bool = False) -> int:
    """The predicted peak the allocator reserves: the largest phase, each with its margin."""
    return max(with_margin(raw, act) for raw, act in _phases(profile, chosen, free))


def phase_reserved(profile: Profile, chosen: dict[str, Option], free: bool = False) -> list[int]:
    """Each phase's predicted reserved bytes (then applying), margins included."""
    return [with_margin(raw, act) for raw, act in _phases(profile, chosen, free)]


def _phases(profile: Profile, chosen: dict[str, Option], free: bool) -> list[tuple[int, int]]:
    """(bytes, largest activation) of each phase, then of applying (phase_peaks says what is counted)."""
    resident = sum(o.resident_bytes for o in chosen.values())
    out = []
    cached = 0
    window = 0  # the largest streaming window so far: held by the side stream's pool
    for ph in profile.phases:
        here = [chosen[n] for n in ph.components if n in chosen]
        extra = sum(o.phase_bytes for o in here)
        windows = [o.phase_bytes for o in here if o.placement == "streamed"]
        held = max(0, window - max(windows, default=0))  # what of the held window this phase's cannot reuse
        act = max((activation(profile, chosen, n) for n in ph.components), default=0)
        out.append((resident + extra + act + cached + held, act))
        if not free:  # else the next phase starts by emptying the cache: nothing is held
            cached += act
            window = max([window, *windows])
    largest_block = max((c.largest_block_bytes for c in profile.components.values()), default=0)
    out.append((resident + largest_block, 0))
    return out


def with_margin(n: float, activation_bytes: int = 0) -> int:
    """`n` counted bytes of a phase whose largest activation is `activation_bytes`, as reserved."""
    return int(math.ceil(n * (1 + ALLOCATOR_MARGIN))) + activation_bytes


def freeing_seconds(profile: Profile) -> float:
    """What emptying the cache at every phase start costs per generation."""
    return EMPTY_CACHE_S * len(profile.phases)


def price(profile: Profile, hw: Hardware, choices: dict[str, tuple[str, str, bool]],
          timings: dict | None = None) -> tuple[float, int]:
    """(predicted seconds per generation, predicted peak bytes) of a hand-made plan:
    choices = {component: (scheme, placement, compile)}."""
    chosen = {}
    for n, (scheme, placement, compiled) in choices.items():
        c = profile.components[n]
        opts = [o for o in options_for(c, hw, {scheme: CATALOG[scheme]}, profile.sensitivity or {}, timings)
                if o.placement == placement and o.compile == compiled and not o.tiled]
        if not opts:
            raise TierquantError(f"{n}: {scheme}/{placement}{'+compile' if compiled else ''} is not possible on {hw.name}")
        chosen[n] = opts[0]
    return sum(o.seconds for o in chosen.values()), reserved_peak(profile, chosen)


