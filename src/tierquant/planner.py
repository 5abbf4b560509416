"""The planner: profile + hardware + catalog -> the fastest plan that fits a memory budget.

`make_plan` is a pure function of plain data (like accelerate's `infer_auto_device_map`): it never
touches a pipeline or a device. `plan` is the convenience front door that profiles a pipeline and
measures the running device first, then calls `make_plan`.

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
from dataclasses import dataclass

from .errors import TierquantError
from .hardware import GiB, Hardware, detect, gib, parse_budget, target as target_hw, usable_budget
from .plan import PLACEMENTS, Choice, Plan
from .profiling import ComponentProfile, Profile
from .schemes import BASELINE, CATALOG, COMPILED_OVERHEAD_S, Scheme, SchemeError

# Without a per-step component, one is speed-critical when it takes this share of a bf16 generation.
CRITICAL_SHARE = 0.05
# Peak bytes are raised by this fraction for the caching allocator's fragmentation (blocks cached
# from one phase that the next cannot reuse), and on a GPU by a fixed reserve for cuBLAS / cuDNN
# workspaces, FP8 scale buffers and compiled graphs. One H200 run of the published recipe reserved
# 20.2 GiB at peak for 14.3 GiB of weights and a 2.57 GiB VAE activation peak (NOTES.md).
ALLOCATOR_MARGIN = 0.10
GPU_WORKSPACE = 1 << 30
# Expected errors are compared at this resolution: int8 weight-only (5e-4 on MiniLM embeddings,
# NOTES.md) is as good as bf16 for choosing, so a faster int8 beats a slower bf16 placement.
ERROR_RESOLUTION = 1e-3
# Fraction of a streamed component's host->device copies hidden behind its compute. Prior from one
# H200 run (shared/gpu/NOTES.md): bf16 Flux, group offload, 0.536 s/step, predicted 0.548 with 0.5.
STREAM_OVERLAP = 0.5


class NoPlanError(TierquantError):
    def __init__(self, message: str, smallest_bytes: int | None = None):
        super().__init__(message)
        self.smallest_bytes = smallest_bytes


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


# -- cost model --------------------------------------------------------------------------------

def weight_bytes(c: ComponentProfile, s: Scheme) -> int:
    """Bytes of `c`'s weights under `s`: quantized Linear weights plus everything else in bf16."""
    q = c.quantizable_params
    return int((c.params - q) * 2 + q * s.bytes_per_param)


def roofline_call_seconds(c: ComponentProfile, s: Scheme, compiled: bool, hw: Hardware) -> float:
    """One call of `c` under `s` on `hw`: matmul work at the scheme's rate, the rest at bf16,
    never faster than one pass over its weights and activations."""
    rate = {"bf16": hw.bf16_flops, "fp8": hw.fp8_flops, "int8": hw.int8_ops}[s.math] or hw.bf16_flops
    base = CATALOG[BASELINE]
    eff = s.efficiency_compiled if compiled else s.efficiency_eager
    base_eff = base.efficiency_compiled if compiled else base.efficiency_eager
    linear = min(c.linear_flops_per_call, c.flops_per_call)
    t_compute = linear / (rate * eff) + (c.flops_per_call - linear) / (hw.bf16_flops * base_eff)
    t_memory = (weight_bytes(c, s) + c.activation_peak_bytes) / hw.bandwidth
    overhead = 0.0
    if hw.device == "cuda":  # a GPU waits on the host for small layers; a CPU is the host
        overhead = len(c.layers) * (COMPILED_OVERHEAD_S if compiled else s.eager_overhead_s)
    return max(t_compute, t_memory) + overhead


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
            if placement == "streamed" and not s.streams:
                continue
            if c.calls == 0 and placement != "swapped" and hw.device != "cpu":
                continue  # never called: it can wait on the host
            # Regional compilation pays its compile time (minutes, for FP8) back only in a
            # speed-critical component, called at every step, and is not combined with block
            # streaming (hooks break the graphs).
            compiles = [False]
            if (hw.device == "cuda" and critical and s.composes_with_compile and c.calls > 1 and c.repeated_blocks
                    and placement != "streamed"):
                compiles.append(True)
            for compiled in compiles:
                key = (c.name, s.name, compiled)
                t = timings[key] if timings and key in timings else roofline_call_seconds(c, s, compiled, hw)
                if placement == "resident":
                    secs, res, ph = c.calls * t, w, 0
                elif placement == "swapped":
                    # In once per generation from a pinned host copy; dropping it again is free.
                    secs, res, ph = c.calls * t + (w / hw.host_link if c.calls else 0.0), 0, w
                else:
                    x = w / hw.host_link  # every call streams all its blocks in
                    secs = c.calls * (t + x - STREAM_OVERLAP * min(t, x))
                    block = int(c.largest_block_bytes * w / max(c.params * 2, 1))
                    res, ph = 0, 2 * block  # one block computing, the next arriving
                out.append(Option(c.name, s.name, placement, compiled, t, secs, w, res, ph, err))
    return out


def _pareto(opts: list[Option]) -> list[Option]:
    """Drop options no better than another in any respect."""
    keep = []
    for o in opts:
        dominated = any(p is not o and p.seconds <= o.seconds and p.error <= o.error and
                        p.resident_bytes <= o.resident_bytes and p.phase_bytes <= o.phase_bytes and
                        (p.seconds, p.error, p.resident_bytes, p.phase_bytes) != (o.seconds, o.error, o.resident_bytes, o.phase_bytes)
                        for p in opts)
        if not dominated and not any(_same(k, o) for k in keep):
            keep.append(o)
    return keep


def _err_level(e: float) -> float:
    return math.floor(e / ERROR_RESOLUTION + 1e-9)


def _same(a: Option, b: Option) -> bool:
    return (a.seconds, a.error, a.resident_bytes, a.phase_bytes) == (b.seconds, b.error, b.resident_bytes, b.phase_bytes)


# -- memory ------------------------------------------------------------------------------------

def phase_peaks(profile: Profile, chosen: dict[str, Option]) -> list[int]:
    """Device bytes in each phase (before the allocator margin), and a last entry for applying:
    components are quantized block by block, so at most one block of bf16 is there extra.

    A phase holds resident weights, its own swapped / streamed weights, its activation peak, and the
    blocks the caching allocator kept from earlier phases' activations (nothing empties the cache
    between phases, and a later phase's tensors of other sizes cannot reuse them)."""
    resident = sum(o.resident_bytes for o in chosen.values())
    peaks = []
    cached = 0
    for ph in profile.phases:
        extra = sum(chosen[n].phase_bytes for n in ph.components if n in chosen)
        act = max((profile.components[n].activation_peak_bytes for n in ph.components), default=0)
        peaks.append(resident + extra + act + cached)
        cached += act
    largest_block = max((c.largest_block_bytes for c in profile.components.values()), default=0)
    peaks.append(resident + largest_block)
    return peaks


def with_margin(n: float, hw: Hardware | None = None) -> int:
    fixed = GPU_WORKSPACE if hw is not None and hw.device == "cuda" else 0
    return int(math.ceil(n * (1 + ALLOCATOR_MARGIN))) + fixed


# -- search ------------------------------------------------------------------------------------

def _search(profile: Profile, opts: dict[str, list[Option]], usable: int, critical: set[str], hw: Hardware,
            objective: str = "latency") -> tuple[dict[str, Option] | None, tuple]:
    """Exact branch and bound. objective 'latency': lexicographic (critical s, error, total s);
    'memory': the smallest peak."""
    names = sorted(opts, key=lambda n: -max(o.seconds for o in opts[n]))
    phase_of = {n: profile.components[n].phase for n in names}
    nphases = len(profile.phases)
    act = [max((profile.components[n].activation_peak_bytes for n in ph.components), default=0) for ph in profile.phases]
    act = [sum(act[:i + 1]) for i in range(len(act))]  # with earlier phases' cached activations
    largest_block = max((c.largest_block_bytes for c in profile.components.values()), default=0)

    def key(o: Option) -> tuple:
        if objective == "memory":
            return (0.0, 0.0, 0.0)
        return (o.seconds if o.component in critical else 0.0, _err_level(o.error), o.seconds)

    for n in names:
        opts[n] = sorted(opts[n], key=lambda o: (key(o), o.resident_bytes + o.phase_bytes))
    rest_min = [tuple(sum(min(key(o)[i] for o in opts[m]) for m in names[k:]) for i in range(3))
                for k in range(len(names) + 1)]
    best: list = [None, (math.inf,) * 3 if objective == "latency" else math.inf]

    def peak(resident: int, extra: list[int]) -> int:
        p = max([resident + extra[i] + act[i] for i in range(nphases)] + [resident + largest_block])
        return with_margin(p, hw)

    def dfs(k: int, chosen: dict, score: tuple, resident: int, extra: list[int]):
        if objective == "latency":
            bound = tuple(score[i] + rest_min[k][i] for i in range(3))
            if bound >= best[1]:
                return
        # memory feasibility so far (the rest can only add bytes)
        p = peak(resident, extra)
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
            e = extra
            if o.phase_bytes and 0 <= ph < nphases:
                e = list(extra)
                e[ph] += o.phase_bytes
            ko = key(o)
            dfs(k + 1, chosen, tuple(score[i] + ko[i] for i in range(3)), resident + o.resident_bytes, e)
            del chosen[n]

    dfs(0, {}, (0.0, 0.0, 0.0), 0, [0] * nphases)
    return best[0], best[1]


# -- the plan ----------------------------------------------------------------------------------

def make_plan(profile: Profile, hw: Hardware, budget_bytes: int, catalog: dict[str, Scheme] | None = None,
              tolerance: float | None = None, pin: dict[str, str] | None = None,
              timings: dict | None = None) -> Plan:
    """The plan for `profile` on `hw` within `budget_bytes`. Pure: plain data in, a Plan out."""
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
    total_bf16 = sum(bf16_seconds(c, hw, timings) for c in profile.components.values()) or 1.0
    # Speed-critical: what runs at every denoising step (its time multiplies with the steps). A
    # profile with no per-step component (one step, or not a diffusion loop) falls back to each
    # component's share of a bf16 generation.
    critical = {n for n, c in profile.components.items() if c.scales_with_steps}
    if not critical:
        critical = {n for n, c in profile.components.items()
                    if bf16_seconds(c, hw, timings) / total_bf16 >= CRITICAL_SHARE}

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
        opts[n] = _pareto(all_opts)

    chosen, score = _search(profile, {n: list(o) for n, o in opts.items()}, usable, critical, hw)
    if chosen is None:
        smallest, smallest_peak = _search(profile, {n: list(o) for n, o in opts.items()}, usable, critical, hw, "memory")
        need = smallest_peak + (budget_bytes - usable)
        raise NoPlanError(
            f"no plan fits {profile.pipeline} in {gib(budget_bytes)} on {hw.name}: the smallest plan needs "
            f"{need / GiB:.2f} GiB. Raise --budget to at least {math.ceil(need / GiB * 10) / 10:.1f}GiB, "
            f"or lower the resolution or batch size.", smallest_bytes=need)

    peaks = phase_peaks(profile, chosen)
    latency = sum(o.seconds for o in chosen.values())
    choices = {n: _explain(n, chosen, opts[n], profile, hw, usable, critical, timings) for n in profile.components}
    if timings:
        notes.append("per-call times measured on this device (micro-benchmarks of the real layer shapes)")
    else:
        notes.append(f"per-call times from a roofline model of {hw.name}")
    return Plan(
        components=choices,
        predicted_latency_s=latency,
        predicted_peak_bytes=with_margin(max(peaks), hw),
        budget_bytes=budget_bytes,
        hardware=hw.to_dict(),
        pipeline=profile.fingerprint(),
        phases=[{"components": ph.components, "peak_bytes": with_margin(peaks[ph.index], hw)} for ph in profile.phases],
        steps=profile.steps,
        notes=notes,
    )


def price(profile: Profile, hw: Hardware, choices: dict[str, tuple[str, str, bool]],
          timings: dict | None = None) -> tuple[float, int]:
    """(predicted seconds per generation, predicted peak bytes) of a hand-made plan:
    choices = {component: (scheme, placement, compile)}."""
    chosen = {}
    for n, (scheme, placement, compiled) in choices.items():
        c = profile.components[n]
        opts = [o for o in options_for(c, hw, {scheme: CATALOG[scheme]}, profile.sensitivity or {}, timings)
                if o.placement == placement and o.compile == compiled]
        if not opts:
            raise TierquantError(f"{n}: {scheme}/{placement}{'+compile' if compiled else ''} is not possible on {hw.name}")
        chosen[n] = opts[0]
    return sum(o.seconds for o in chosen.values()), with_margin(max(phase_peaks(profile, chosen)), hw)


def _fits(profile: Profile, chosen: dict[str, Option], usable: int, hw: Hardware) -> tuple[bool, int]:
    p = with_margin(max(phase_peaks(profile, chosen)), hw)
    return p <= usable, p


def _label(o: Option) -> str:
    return f"{o.scheme}/{o.placement}{'+compile' if o.compile else ''}"


def _explain(n: str, chosen: dict[str, Option], opts: list[Option], profile: Profile, hw: Hardware, usable: int,
             critical: set[str], timings) -> Choice:
    o = chosen[n]
    c = profile.components[n]
    bound = "compute-bound" if c.intensity() >= hw.ridge_point else "memory-bound"
    role = (f"speed-critical ({c.calls} calls, {bound} at {c.intensity():.0f} FLOP/B vs ridge {hw.ridge_point:.0f}): "
            f"the fastest option that fits" if n in critical else
            f"{c.calls} call{'s' if c.calls != 1 else ''}, a small share of the generation: "
            f"the most faithful option that fits, then the fastest")
    where = {"resident": "stays on the device",
             "swapped": f"on the device only during its phase ({gib(o.weight_bytes)} copied in per generation)",
             "streamed": "streamed block by block from the host at every call"}[o.placement]
    reason = f"{role}; {where}"
    # The best alternative and why it lost: ranked as the search ranks, fit ignored.
    def rank(x: Option):
        return (x.seconds if n in critical else 0.0, _err_level(x.error), x.seconds)
    alts = sorted((x for x in opts if x != o), key=rank)
    rejected = None
    if alts:
        a = alts[0]
        fits, p = _fits(profile, {**chosen, n: a}, usable, hw)
        if not fits:
            why = f"does not fit: peak {gib(p)} > {gib(usable)} usable"
        elif n in critical and a.seconds > o.seconds:
            why = f"slower: {a.seconds:.3f} s vs {o.seconds:.3f} s per generation"
        elif _err_level(a.error) > _err_level(o.error):
            why = f"higher expected error: {a.error:.4f} vs {o.error:.4f}"
        else:
            why = f"slower: {a.seconds:.3f} s vs {o.seconds:.3f} s per generation"
        rejected = {"scheme": a.scheme, "placement": a.placement, "compile": a.compile, "why": why}
    return Choice(scheme=o.scheme, placement=o.placement, compile=o.compile, predicted_seconds=o.seconds,
                  weight_bytes=o.weight_bytes, expected_error=o.error, reason=reason, rejected=rejected,
                  kept={l.name: l.keep for l in c.layers if l.keep} if o.scheme != BASELINE else {})


def resolve_hardware(target: str | Hardware | None) -> Hardware:
    if isinstance(target, Hardware):
        return target
    return target_hw(target) if target else detect()


def plan(pipe_or_profile, budget, target=None, tolerance=None, pin=None, catalog=None, steps=None,
         measure: bool | None = None, **call_kwargs) -> Plan:
    """The fastest plan for a pipeline (or a Profile, or a built-in pipeline's name) within `budget`.

    target: a name from hardware.TARGETS to plan for another card (roofline model), or None for the
    running device (micro-benchmarks of the real layer shapes where affordable, cached on disk).
    pin: {"component": "scheme"} fixes schemes; the planner optimises the rest.
    """
    hw = resolve_hardware(target)
    budget_bytes = parse_budget(budget)
    if isinstance(catalog, (list, tuple, set)):
        catalog = {s: CATALOG[s] for s in catalog}
    if isinstance(pipe_or_profile, Profile):
        prof = pipe_or_profile
    elif isinstance(pipe_or_profile, str):
        from .pipelines.builtin import default_call, profile_builtin

        prof = profile_builtin(pipe_or_profile, **call_kwargs)
        steps = steps or default_call(pipe_or_profile).get("num_inference_steps")
    else:
        from .measure import profile as measure_profile

        prof = measure_profile(pipe_or_profile, **call_kwargs)
    if steps:
        prof = prof.scaled(steps)
    timings = None
    if target is None and measure is not False:
        from .calibrate import timings_for

        timings = timings_for(prof, hw, catalog or CATALOG, force=bool(measure))
    return make_plan(prof, hw, budget_bytes, catalog=catalog, tolerance=tolerance, pin=pin, timings=timings)
