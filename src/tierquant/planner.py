"""The planner: profile + hardware + catalog -> the fastest plan that fits a memory budget.

`make_plan` is a pure function of plain data (like accelerate's `infer_auto_device_map`): it never
touches a pipeline or a device. `tierquant.plan` is the front door that profiles a pipeline and
measures the running device first (side effects), then calls `make_plan`. The cost of each option
is `cost.py`'s.

The search. Every component gets every (scheme, placement, compile) option the hardware and the
scheme allow; each option costs seconds per generation (calls x time per call, plus host transfers)
and bytes (counted in every phase when resident, only in its own phase when swapped or streamed).
A plan fits when, in every phase, resident weights + that phase's swapped/streamed weights + the
phase's activation peak, with an allocator margin, stay under the budget. Among plans that fit it
picks, in this order:
  1. the least time spent in *speed-critical* components (those called at every denoising step,
     whose time multiplies with the steps: the denoiser);
  2. the least expected error (measured sensitivities where the profile has them, priors otherwise):
     a text encoder that runs once is a rounding error of the latency, so it gets the most faithful
     scheme that fits rather than the fastest;
  3. the least total time.
Branch and bound makes the search exact, so more budget never gives a slower speed-critical part.
"""
from __future__ import annotations

import math
from dataclasses import replace

from .cost import (WARM_COMPILE_SHARE, Option, bf16_seconds, blocks_of, freeing_seconds, options_for, phase_reserved,
                   reserved_peak, with_margin)
from .errors import NoPlanError, SchemeError, TierquantError
from .hardware import GiB, Hardware, gib, usable_budget
from .plan import Choice, Plan
from .profile import Profile
from .schemes import BASELINE, CATALOG, Scheme

# Without a per-step component, one is speed-critical when it takes this share of a bf16 generation.
CRITICAL_SHARE = 0.05
# Expected errors are compared at this resolution: int8 weight-only (5e-4 on MiniLM embeddings,
# docs/measurements.md) is as good as bf16 for choosing, so a faster int8 beats a slower bf16 placement.
ERROR_RESOLUTION = 1e-3
# For a component that is not speed-critical, memory differences under this share of its bf16 size
# do not justify a less faithful scheme (see _faithful).
FAITHFUL_SLACK = 0.05


def _pareto(opts: list[Option]) -> list[Option]:
    """Drop options no better than another in any respect."""
    keep = []
    for o in opts:
        dominated = any(p is not o and p.seconds <= o.seconds and p.error <= o.error and
                        p.resident_bytes <= o.resident_bytes and p.phase_bytes <= o.phase_bytes and
                        p.activation_bytes <= o.activation_bytes and not _same(p, o)
                        for p in opts)
        if not dominated and not any(_same(k, o) for k in keep):
            keep.append(o)
    return keep


def _faithful(opts: list[Option], slack: int = 0) -> list[Option]:
    """For a component that is not speed-critical: drop every option for which another is more
    faithful (a lower error level) and needs no more device memory, whatever their speeds. What is
    left is a choice between memory and fidelity; the search then takes the fastest plan among them.
    This is why a text encoder that runs once keeps its precision unless memory forces otherwise,
    while the objective stays the plan's latency (so more budget never gives a slower plan).
    `slack`: memory differences this small do not count (an NF4 streaming window a few hundred MB
    smaller than an int8 one is no reason to lose 26x the fidelity)."""
    return [o for o in opts if not any(_err_level(p.error) < _err_level(o.error) and _no_more_memory(p, o, slack)
                                       for p in opts)]


def _no_more_memory(p: Option, o: Option, slack: int = 0) -> bool:
    """p needs no more device memory than o (give or take `slack`) at any moment: outside its phase
    (resident bytes) and during it (resident and phase bytes)."""
    return (p.resident_bytes <= o.resident_bytes + slack
            and (p.resident_bytes + p.phase_bytes + p.activation_bytes
                 <= o.resident_bytes + o.phase_bytes + o.activation_bytes + slack))


def _err_level(e: float) -> float:
    return math.floor(e / ERROR_RESOLUTION + 1e-9)


def _same(a: Option, b: Option) -> bool:
    return ((a.seconds, a.error, a.resident_bytes, a.phase_bytes, a.activation_bytes)
            == (b.seconds, b.error, b.resident_bytes, b.phase_bytes, b.activation_bytes))


# -- search ------------------------------------------------------------------------------------

def _search(profile: Profile, opts: dict[str, list[Option]], usable: int, critical: set[str], hw: Hardware,
            objective: str = "latency", free: bool = False) -> tuple[dict[str, Option] | None, tuple]:
    """Exact branch and bound. objective 'latency': lexicographic (critical s, error, total s);
    'memory': the smallest peak. free: the allocator's cache is emptied when a phase starts, so no
    phase carries an earlier one's activations (cost.phase_peaks)."""
    names = sorted(opts, key=lambda n: -max(o.seconds for o in opts[n]))
    phase_of = {n: profile.components[n].phase for n in names}
    nphases = len(profile.phases)
    in_phase = [[n for n in ph.components if n in phase_of] for ph in profile.phases]
    fixed = [max((profile.components[n].activation_peak_bytes for n in ph.components if n not in phase_of),
                 default=0) for ph in profile.phases]
    # The least activation each phase can have once components from position k on are still open:
    # what the bound assumes for them.
    least = {n: min(o.activation_bytes for o in opts[n]) for n in names}
    open_act = [[max([least[m] for m in names[k:] if phase_of[m] == i], default=0) for i in range(nphases)]
                for k in range(len(names) + 1)]
    # Likewise the largest streaming window a phase can still get (it may reuse the held window).
    win_of = {n: max((o.phase_bytes for o in opts[n] if o.placement == "streamed"), default=0) for n in names}
    open_win = [[max([win_of[m] for m in names[k:] if phase_of[m] == i], default=0) for i in range(nphases)]
                for k in range(len(names) + 1)]
    largest_block = max((c.largest_block_bytes for c in profile.components.values()), default=0)

    def key(o: Option) -> tuple:
        if objective == "memory":
            return (0.0, 0.0, 0.0)
        return (o.seconds, _err_level(o.error), 0.0)

    for n in names:
        opts[n] = sorted(opts[n], key=lambda o: (key(o), o.resident_bytes + o.phase_bytes + o.activation_bytes))
    rest_min = [tuple(sum(min(key(o)[i] for o in opts[m]) for m in names[k:]) for i in range(3))
                for k in range(len(names) + 1)]
    best: list = [None, (math.inf,) * 3 if objective == "latency" else math.inf]

    def peak(k: int, resident: int, extra: list[int], act: list[int], win: list[int]) -> int:
        """cost.phase_peaks, as a lower bound while components from position k on are open."""
        cached, window, peaks = 0, 0, [with_margin(resident + largest_block)]
        for i in range(nphases):
            a = max(act[i], open_act[k][i], fixed[i])
            raw = resident + extra[i] + a + cached + max(0, window - max(win[i], open_win[k][i]))
            peaks.append(with_margin(raw, a))
            if not free:
                cached += a
                window = max(window, win[i])
        return max(peaks)

    def dfs(k: int, chosen: dict, score: tuple, resident: int, extra: list[int], act: list[int], win: list[int]):
        if objective == "latency":
            bound = tuple(score[i] + rest_min[k][i] for i in range(3))
            if bound >= best[1]:
                return
        # memory feasibility so far (the rest can only add bytes)
        p = peak(k, resident, extra, act, win)
        if objective == "latency" and p > usable:
            return
        if objective == "memory" and p >= best[1]:
            return
        if k == len(names):
            best[0], best[1] = dict(chosen), (score if objective == "latency" else p)
            return
        n = names[k]
        ph = phase_of[n]
        for o in opts[n]:
            chosen[n] = o
            e, a, w = extra, act, win
            if 0 <= ph < nphases:
                if o.phase_bytes:
                    e = list(extra)
                    e[ph] += o.phase_bytes
                if o.activation_bytes > act[ph]:
                    a = list(act)
                    a[ph] = o.activation_bytes
                if o.placement == "streamed" and o.phase_bytes > win[ph]:
                    w = list(win)
                    w[ph] = o.phase_bytes
            ko = key(o)
            dfs(k + 1, chosen, tuple(score[i] + ko[i] for i in range(3)), resident + o.resident_bytes, e, a, w)
            del chosen[n]

    dfs(0, {}, (0.0, 0.0, 0.0), 0, [0] * nphases, [0] * nphases, [0] * nphases)
    return best[0], best[1]


# -- the plan ----------------------------------------------------------------------------------

def _budget_at_least(nbytes: float) -> str:
    """A --budget that covers `nbytes`, rounded up to a tenth of its unit: '12.3GiB', or '2.7MiB' for
    a tiny pipeline (never '0.0GiB')."""
    unit, name = (GiB, "GiB") if nbytes >= GiB else (2**20, "MiB")
    return f"{math.ceil(nbytes / unit * 10) / 10:.1f}{name}"


def make_plan(profile: Profile, hw: Hardware, budget_bytes: int, catalog: dict[str, Scheme] | None = None,
              tolerance: float | None = None, pin: dict[str, str] | None = None,
              timings: dict | None = None, images: int | None = None, critical: set[str] | None = None) -> Plan:
    """The plan for `profile` on `hw` within `budget_bytes`. Pure: plain data in, a Plan out.

    images: how many images the process will make. Given, compilation is charged its cold compile
    time spread over them, so a plan for one image compiles only what pays back within it; and the
    predicted seconds per image are the mean over those images, compilation included. None: many
    images (compilation always pays back; the steady seconds per image).
    critical: the speed-critical components, where the caller decides (`devices.py` plans one card of
    several with the whole pipeline's); None: found here, from this profile."""
    catalog = dict(catalog or CATALOG)
    pin = dict(pin or {})
    sensitivity = profile.sensitivity or {}
    notes: list[str] = []
    for name, scheme in pin.items():
        if name not in profile.components:
            raise TierquantError(f"cannot pin {name!r}: the pipeline has no such component "
                                 f"(it has {', '.join(profile.components)})")
        s = CATALOG.get(scheme)
        if s is None:
            raise SchemeError(f"cannot pin {name!r} to unknown scheme {scheme!r}: choose one of {', '.join(CATALOG)}")
        why = s.available_on(hw)
        if why:
            alternatives = [x.name for x in CATALOG.values() if x.name != scheme and not x.available_on(hw)
                            and x.name != BASELINE]
            raise SchemeError(f"cannot use {scheme} for {name} on {hw.name}: {why}. "
                              f"Use one of {', '.join(alternatives)} instead, or plan for another --target.")
    for s in CATALOG.values():
        why = s.available_on(hw)
        if why and s.name in catalog:
            notes.append(f"{s.name} not considered: {why}")

    usable = usable_budget(budget_bytes, hw)
    if hw.device == "cuda" and hw.memory_bytes and budget_bytes > hw.memory_bytes:
        # The API plans sweeps past a card's memory (the CLI refuses them): say what was planned.
        notes.append(f"the budget is more than the {hw.name}'s {gib(hw.memory_bytes)}: planned for the whole card")
    total_bf16 = sum(bf16_seconds(c, hw, timings) for c in profile.components.values()) or 1.0
    # Speed-critical: what runs at every denoising step (its time multiplies with the steps). A
    # profile with no per-step component (one step, or not a diffusion loop) falls back to each
    # component's share of a bf16 generation.
    given, critical = critical, {n for n, c in profile.components.items() if c.scales_with_steps}
    if not critical:
        critical = {n for n, c in profile.components.items()
                    if bf16_seconds(c, hw, timings) / total_bf16 >= CRITICAL_SHARE}
    if given is not None:
        critical = set(given) & set(profile.components)

    opts: dict[str, list[Option]] = {}
    for n, c in profile.components.items():
        cat = {pin[n]: CATALOG[pin[n]]} if n in pin else catalog
        all_opts = options_for(c, hw, cat, sensitivity, timings, critical=n in critical)
        if tolerance is not None and n not in pin:
            within = [o for o in all_opts if o.error <= tolerance]
            dropped = sorted({o.scheme for o in all_opts} - {o.scheme for o in within})
            if dropped:
                notes.append(f"{n}: {', '.join(dropped)} exceed the tolerance {tolerance:g}")
            all_opts = within
        if not all_opts:
            raise NoPlanError(f"no scheme for {n} is available on {hw.name} within the tolerance; "
                              f"raise the tolerance or allow more schemes")
        if images:
            all_opts = [replace(o, seconds=o.seconds + o.compile_s / images) if o.compile else o for o in all_opts]
        opts[n] = _pareto(all_opts if n in critical else _faithful(all_opts, int(FAITHFUL_SLACK * c.params * 2)))

    # Emptying the allocator's cache when each phase starts costs milliseconds and frees what earlier
    # phases' activations left cached: searched both ways on a GPU, the faster plan kept (without it
    # where they tie, as it costs a little).
    frees = [False, True] if hw.device == "cuda" and len(profile.phases) > 1 else [False]
    chosen, score, free = None, (math.inf,) * 3, False
    for f in frees:
        got, sc = _search(profile, {n: list(o) for n, o in opts.items()}, usable, critical, hw, free=f)
        if got is not None:
            sc = (sc[0] + (freeing_seconds(profile) if f else 0.0),) + tuple(sc[1:])
            if sc < score:
                chosen, score, free = got, sc, f
    if chosen is None:
        smallest, smallest_peak = _search(profile, {n: list(o) for n, o in opts.items()}, usable, critical, hw,
                                          "memory", free=frees[-1])
        need = smallest_peak + (budget_bytes - usable)
        raise NoPlanError(
            f"no plan fits {profile.pipeline} in {gib(budget_bytes)} on {hw.name}: the smallest plan needs "
            f"{gib(need)}. Raise --budget to at least {_budget_at_least(need)}, "
            f"or lower the resolution or batch size.", smallest_bytes=need)

    peaks = phase_reserved(profile, chosen, free)
    latency = sum(o.seconds for o in chosen.values()) + (freeing_seconds(profile) if free else 0.0)
    if free:
        notes.append(f"the allocator's cache is emptied when each phase starts ({1e3 * freeing_seconds(profile):.0f} ms "
                     f"per generation), so no phase carries earlier phases' activations")
    choices = {n: _explain(n, chosen, opts[n], profile, hw, usable, critical, free) for n in profile.components}
    for n, o in chosen.items():
        if o.compile:  # when compiling pays back: against the same option run eagerly
            same = [x for x in options_for(profile.components[n], hw, {o.scheme: CATALOG[o.scheme]}, sensitivity,
                                           timings, critical=True)
                    if not x.compile and (x.placement, x.resident_blocks, x.prefetch) == (o.placement, o.resident_blocks,
                                                                                        o.prefetch)]
            steady = o.seconds - (o.compile_s / images if images else 0.0)
            if same and same[0].seconds > steady:
                gain = same[0].seconds - steady
                notes.append(f"{n}: compiling takes about {o.compile_s:.0f} s from a cold cache "
                             f"({WARM_COMPILE_SHARE * o.compile_s:.0f} s with an earlier process's caches) and saves "
                             f"{gain:.2f} s per image: it pays back after {math.ceil(o.compile_s / gain)} images")
    if timings:
        notes.append("per-call times measured on this device (micro-benchmarks of the real layer shapes)")
    else:
        notes.append(f"per-call times from a roofline model of {hw.name}")
    return Plan(
        components=choices,
        predicted_latency_s=latency,
        predicted_peak_bytes=max(peaks),
        budget_bytes=budget_bytes,
        hardware=hw.to_dict(),
        pipeline=profile.fingerprint(),
        phases=[{"components": ph.components, "peak_bytes": peaks[ph.index]} for ph in profile.phases],
        steps=profile.steps,
        notes=notes,
        host_bytes=sum(o.host_bytes for o in chosen.values()),
        compile_s=sum(o.compile_s for o in chosen.values()),
        compile_warm_s=WARM_COMPILE_SHARE * sum(o.compile_s for o in chosen.values()),
        images=images,
        free_between_phases=free,
    )


def _fits(profile: Profile, chosen: dict[str, Option], usable: int, hw: Hardware, free: bool) -> tuple[bool, int]:
    p = reserved_peak(profile, chosen, free)
    return p <= usable, p


def _explain(n: str, chosen: dict[str, Option], opts: list[Option], profile: Profile, hw: Hardware, usable: int,
             critical: set[str], free: bool) -> Choice:
    o = chosen[n]
    c = profile.components[n]
    bound = "compute-bound" if c.intensity() >= hw.ridge_point else "memory-bound"
    role = (f"speed-critical ({c.calls} calls, {bound} at {c.intensity():.0f} FLOP/B vs ridge {hw.ridge_point:.0f}): "
            f"the fastest option that fits" if n in critical else
            f"{c.calls} call{'s' if c.calls != 1 else ''}, a small share of the generation: "
            f"as faithful as it can be without needing more memory, then the fastest")
    where = {"resident": "stays on the device",
             "swapped": f"on the device only during its phase ({gib(o.weight_bytes)} copied in per generation)",
             "streamed": _streaming(o, c)}[o.placement]
    reason = f"{role}; {where}"
    if o.tiled:
        reason += (f"; decodes in tiles: {gib(o.activation_bytes)} of activations at its peak instead of "
                   f"{gib(c.activation_peak_bytes)}, for {c.tiled_work:.2f}x the decoding work")
    # The best alternative and why it lost: ranked as the search ranks, fit ignored.
    def rank(x: Option):
        return (x.seconds if n in critical else 0.0, _err_level(x.error), x.seconds)
    alts = sorted((x for x in opts if x != o), key=rank)
    rejected = None
    if alts:
        a = alts[0]
        fits, p = _fits(profile, {**chosen, n: a}, usable, hw, free)
        if not fits:
            why = f"does not fit: peak {gib(p)} > {gib(usable)} usable"
        elif n in critical and a.seconds > o.seconds:
            why = f"slower: {a.seconds:.3f} s vs {o.seconds:.3f} s per generation"
        elif _err_level(a.error) > _err_level(o.error):
            why = f"higher expected error: {a.error:.4f} vs {o.error:.4f}"
        else:
            why = f"slower: {a.seconds:.3f} s vs {o.seconds:.3f} s per generation"
        rejected = {"scheme": a.scheme, "placement": a.placement, "compile": a.compile, "why": why}
        if a.tiled:
            rejected["tiled"] = True
    return Choice(scheme=o.scheme, placement=o.placement, compile=o.compile, predicted_seconds=o.seconds, tiled=o.tiled,
                  resident_blocks=o.resident_blocks, prefetch=o.prefetch, host_bytes=o.host_bytes,
                  streamed=list(o.streamed) if o.streamed is not None else None,
                  weight_bytes=o.weight_bytes, expected_error=o.error, reason=reason, rejected=rejected,
                  kept={l.name: l.keep for l in c.layers if l.keep} if o.scheme != BASELINE else {})


def _streaming(o: Option, c) -> str:
    n = len(blocks_of(c))
    kept = f"{o.resident_blocks} of its {n} blocks stay on the device, " if o.resident_blocks else ""
    spread = ", spread by their compute" if o.streamed is not None else ""
    return (f"{kept}{n - (o.resident_blocks or 0)} stream from pinned host memory at every call{spread}, "
            f"{o.prefetch} block{'s' if o.prefetch != 1 else ''} ahead of the one computing ({gib(o.host_bytes)} on the host)")
