"""Per-call times on the running device, from micro-benchmarks of a component's real Linear shapes.

The planner stays pure: this module measures and hands it a table
    {(component, scheme, compiled): seconds per call}
cached on disk by device (`hardware.device_label`), library versions and shapes, so a second plan
costs nothing and a table measured on one card is never used for another.
A component's call = the rest of its work (the profile's measured call less its Linear layers when
the profile was made on this device, else the roofline's whole call less them) + the sum over its
Linear layers of the measured layer time.

Micro-benchmarks are noisy (a cold CPU, a busy machine): each layer time is the median of several
calls after a warm-up, and is checked against the layer's roofline (`implausible`). One that
disagrees is measured again; if it still disagrees it is replaced by the roofline estimate scaled to
this device, and flagged: the cache keeps the flag, and the next call measures that entry again.
`timings_for(..., remeasure=True)` (`tierquant.plan(..., remeasure=True)`) measures everything anew.
"""
from __future__ import annotations

import json
import statistics
import time

import torch
from torch import nn

from . import cache
from .backends import quantize
from .cost import math_rate, roofline_call_seconds
from .hardware import Hardware, device_label
from .profile import ComponentProfile, Profile
from .schemes import BASELINE, CATALOG, Scheme

# Work above which a CPU is not asked to benchmark (FLOPs per scheme); the roofline answers instead.
CPU_BENCH_FLOPS = 5e10


def _versions() -> dict:
    out = {"torch": torch.__version__}
    for mod in ("torchao", "bitsandbytes"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing backend just means its schemes go unmeasured
            out[mod] = None
    return out


def _shapes(c: ComponentProfile) -> dict[tuple[int, int, int], int]:
    """(in, out, rows) -> how many quantizable layers of that shape run per call."""
    out: dict[tuple[int, int, int], int] = {}
    for l in c.layers:
        if l.keep is None and l.rows_per_call > 0:
            key = (l.in_features, l.out_features, max(1, int(round(l.rows_per_call))))
            out[key] = out.get(key, 0) + 1
    return out


class Timings(dict):
    """{(component, scheme, compiled): seconds per call}, and `flags`: the layer timings that disagreed
    with the roofline twice and were estimated instead, {(in, out, rows, scheme): why}."""

    def __init__(self, *args, flags: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.flags = dict(flags or {})


# -- timing one layer --------------------------------------------------------------------------
# A first call pays for allocations, lazy initialisation and cold caches: calls run untimed until
# both counts are reached.
WARMUP_CALLS, WARMUP_S = 3, 0.02
# Then at least MIN_REPS timed calls, and more until TIME_CAP_S has passed or MAX_REPS were made;
# the median of them. A busy machine or a cold CPU makes single calls slow by 100x or more.
MIN_REPS, MAX_REPS = 5, 30
TIME_CAP_S = {"cuda": 0.05, "cpu": 0.1}


def _time(fn, device: str, patience: float = 1.0) -> float:
    """Median seconds of `fn()` after a warm-up (see WARMUP_CALLS, MIN_REPS, TIME_CAP_S; `patience`
    multiplies the time cap)."""
    cuda = device == "cuda"
    t0, n = time.perf_counter(), 0
    while n < WARMUP_CALLS or (time.perf_counter() - t0 < WARMUP_S and n < MAX_REPS):
        fn()
        n += 1
        if cuda:
            torch.cuda.synchronize()
    cap = TIME_CAP_S["cuda" if cuda else "cpu"] * patience
    times: list[float] = []
    t0 = time.perf_counter()
    while len(times) < MIN_REPS or (len(times) < MAX_REPS and time.perf_counter() - t0 < cap):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def bench_linear(in_f: int, out_f: int, rows: int, scheme: str, device: str, patience: float = 1.0) -> float:
    """Seconds for one bf16 (rows x in) @ (in x out) under `scheme` on `device`, eager."""
    layer = nn.Sequential(nn.Linear(in_f, out_f, dtype=torch.bfloat16, device=device)).eval()
    quantize(layer, scheme)
    x = torch.randn(rows, in_f, dtype=torch.bfloat16, device=device)
    return _time(lambda: layer(x), device, patience)


# -- is a layer time believable ----------------------------------------------------------------
# A measured layer time more than this many times the roofline estimate (at the scheme's own
# efficiency prior, or its host time per call where that is longer) is not believed: a cold CPU once recorded
# outliers of ~250x, and the planner took a 2x slower scheme for the fastest.
SLOW_FACTOR = 20.0


def estimate_layer_seconds(in_f: int, out_f: int, rows: int, s: Scheme, hw: Hardware) -> float:
    """The roofline of one eager (rows x in) @ (in x out) under `s` on `hw`: FLOPs at the scheme's rate
    and eager efficiency, one pass over weights and activations, or the scheme's host time per call
    (Python dispatch, launches), whichever is longest. A CPU is its own host: there the host time adds."""
    flops = 2.0 * rows * in_f * out_f
    nbytes = in_f * out_f * s.bytes_per_param + rows * (in_f + out_f) * 2
    work = max(flops / (math_rate(s, hw) * s.efficiency_eager), nbytes / hw.bandwidth)
    return work + s.eager_overhead_s if hw.device == "cpu" else max(work, s.eager_overhead_s)


def implausible(seconds: float, in_f: int, out_f: int, rows: int, s: Scheme, hw: Hardware) -> str | None:
    """Why a measured layer time cannot be right, or None when it can.

    Too slow: over SLOW_FACTOR x the roofline estimate. Too fast: under the FLOPs at the device's peak
    rate, on a GPU (datasheet peaks; the CPU row of the hardware table is a generic figure, not this
    CPU's peak, so a CPU is never called too fast)."""
    est = estimate_layer_seconds(in_f, out_f, rows, s, hw)
    if not seconds > 0 or seconds != seconds:
        return f"measured {seconds!r} s"
    if seconds > SLOW_FACTOR * est:
        return (f"measured {seconds * 1e6:.0f} us, {seconds / est:.0f}x the roofline estimate of "
                f"{est * 1e6:.1f} us (more than {SLOW_FACTOR:g}x)")
    peak = 2.0 * rows * in_f * out_f / math_rate(s, hw)
    if hw.device == "cuda" and seconds < peak:
        return f"measured {seconds * 1e6:.2f} us, faster than the device's peak rate allows ({peak * 1e6:.2f} us)"
    return None


def timings_for(profile: Profile, hw: Hardware, catalog: dict[str, Scheme] | None = None,
                force: bool = False, remeasure: bool = False) -> Timings | None:
    """Measured per-call times for every component and runnable scheme, or None where the device
    cannot afford the benchmarks (full-size shapes on a CPU; `force` measures anyway) and the
    roofline should answer.

    Layer times are cached on disk per device, library versions, schemes and shapes. A layer time
    that disagrees with the roofline twice is replaced by an estimate and flagged in the cache:
    flagged (and missing) entries are measured again at the next call. `remeasure` ignores the
    cache, measures every layer again and overwrites it."""
    catalog = catalog or CATALOG
    schemes = [s for s in catalog.values() if not s.available_on(hw)]
    if BASELINE not in [s.name for s in schemes]:
        schemes.insert(0, CATALOG[BASELINE])
    shapes = {n: _shapes(c) for n, c in profile.components.items()}
    work = sum(2 * i * o * r * k for s in shapes.values() for (i, o, r), k in s.items())
    if hw.device == "cpu" and work > CPU_BENCH_FLOPS and not force:
        return None
    here = device_label()
    path = cache.folder("timings") / (cache.key({"device": here, "versions": _versions(), "format": CACHE_FORMAT,
                                                 "schemes": [s.name for s in schemes],
                                                 "shapes": sorted({k for s in shapes.values() for k in s})}) + ".json")
    layer_t, flags = ({}, {}) if remeasure else _read(path)
    uniq = sorted({k for s in shapes.values() for k in s})
    missing = [(shape, s) for shape in uniq for s in schemes if (*shape, s.name, False) not in layer_t]
    flagged = [(shape, s) for shape in uniq for s in schemes if (*shape, s.name, False) in flags]
    if missing or flagged:
        for measure, jobs in ((_measure, missing), (_recheck, flagged)):
            if jobs:
                got, new_flags = measure(jobs, hw)
                for key in got:
                    flags.pop(key, None)
                layer_t.update(got)
                flags.update(new_flags)
        _estimate_flagged(layer_t, flags, hw)
        cache.write_json(path, {"format": CACHE_FORMAT,
                                "times": {json.dumps(list(k)): v for k, v in layer_t.items()},
                                "flags": {json.dumps(list(k)): why for k, why in flags.items()}})
    table = _assemble(profile, hw, schemes, shapes, layer_t, here)
    return Timings(table, flags={k[:4]: why for k, why in flags.items()
                                 if k[:3] in {shape for s in shapes.values() for shape in s}})


# The cache's layout: {"format": 2, "times": {"[in, out, rows, scheme, compiled]": s}, "flags": {same key: why}}.
# Tables of format 1 (a bare {key: s}) were never checked against the roofline: a new key ignores them.
CACHE_FORMAT = 2


def _read(path) -> tuple[dict, dict]:
    """(layer times, flags) from a cache entry; empty where it is missing or damaged (measured again)."""
    stored = cache.read_json(path)
    try:
        times = {tuple(json.loads(k)): float(v) for k, v in stored["times"].items()}
        flags = {tuple(json.loads(k)): str(v) for k, v in stored.get("flags", {}).items()}
        return times, flags
    except (AttributeError, TypeError, ValueError, KeyError):
        return {}, {}


def _measure(jobs: list[tuple[tuple[int, int, int], Scheme]], hw: Hardware) -> tuple[dict, dict]:
    """Layer times for (shape, scheme) jobs, and the flags of those that stayed implausible when
    measured again (their times are estimated afterwards, see _estimate_flagged)."""
    return _bench_jobs(jobs, hw, "Measuring layer shapes", patience=1.0)


# A flagged entry is measured again with this many times the usual time cap: more calls, so that a
# machine that was busy for a moment weighs less in the median.
RECHECK_PATIENCE = 3.0


def _recheck(jobs: list[tuple[tuple[int, int, int], Scheme]], hw: Hardware) -> tuple[dict, dict]:
    """The flagged entries of a cached table, measured again more patiently (RECHECK_PATIENCE)."""
    return _bench_jobs(jobs, hw, "Measuring flagged layer shapes again", patience=RECHECK_PATIENCE)


def _bench_jobs(jobs, hw: Hardware, description: str, patience: float) -> tuple[dict, dict]:
    device = "cuda" if hw.device == "cuda" else "cpu"
    out, flags = {}, {}
    try:
        from rich.progress import track
    except ImportError:  # pragma: no cover
        track = lambda it, **_: it  # noqa: E731
    for (i, o, r), s in track(jobs, description=description, transient=True):
        key = (i, o, r, s.name, False)
        t = bench_linear(i, o, r, s.name, device, patience)
        why = implausible(t, i, o, r, s, hw)
        if why:  # an outlier (a cold start, a busy machine) or real: measure once more
            t2 = bench_linear(i, o, r, s.name, device, patience)
            why2 = implausible(t2, i, o, r, s, hw)
            if why2:
                flags[key] = (f"{why}; again {why2.split(', ', 1)[0].removeprefix('measured ')}: "
                              "replaced by the roofline estimate scaled to this device")
            t = t2
        out[key] = t
        if device == "cuda":
            torch.cuda.empty_cache()
    return out, flags


def _estimate_flagged(layer_t: dict, flags: dict, hw: Hardware) -> None:
    """Replace flagged layer times by the roofline estimate scaled to this device and scheme: by the
    median ratio of measured to estimated time over the scheme's entries that are not flagged (over
    all schemes' where it has none; 1 where nothing is measured), so that an estimated entry is
    neither favoured nor penalised against measured ones."""
    def est(key):
        i, o, r, name, _ = key
        return estimate_layer_seconds(i, o, r, CATALOG[name], hw)

    good = [k for k in layer_t if k not in flags and k[3] in CATALOG]
    overall = statistics.median([layer_t[k] / est(k) for k in good]) if good else 1.0
    for key in flags:
        if key in layer_t and key[3] in CATALOG:
            same = [layer_t[k] / est(k) for k in good if k[3] == key[3]]
            layer_t[key] = (statistics.median(same) if same else overall) * est(key)


def _assemble(profile, hw, schemes, shapes, layer_t, here: str) -> dict:
    table = {}
    base = CATALOG[BASELINE]
    for n, c in profile.components.items():
        lin = {s.name: sum(k * layer_t[(*shape, s.name, False)] for shape, k in shapes[n].items()) for s in schemes}
        # A profile's own timings count only where it was measured: on this very device.
        measured_here = c.seconds_per_call is not None and profile.device == here
        if measured_here:
            other = max(c.seconds_per_call - lin[BASELINE], 0.0)
        else:
            # Not measured here: the roofline's whole bf16 call stands for the call, and the layer
            # timings say how much each scheme's Linear layers take on top of or off bf16's. (The
            # roofline's eager efficiency is fitted to whole calls, with the norms, activations and
            # other elementwise work between the matmuls; isolated Linear layers run closer to peak.
            # Adding the roofline's share of the non-Linear FLOPs to the measured layers left that
            # work out: on an H100 the 24 GiB plans made from built-in pipelines predicted 25% (Flux)
            # and 35% (SD3.5-large) under the measured time, docs/gpu.md.)
            other = max(roofline_call_seconds(c, base, False, hw) - lin[BASELINE], 0.0)
        for s in schemes:
            table[(n, s.name, False)] = other + lin[s.name]
        if hw.device == "cuda":
            # Compiled: compiling every layer shape under every scheme would cost minutes per plan,
            # and a single eager layer carries dispatch overhead that compilation removes. So the
            # measured bf16 call anchors the roofline: compiled(s) = bf16 eager measured x
            # roofline(s, compiled) / roofline(bf16, eager).
            anchor = table[(n, BASELINE, False)] / max(roofline_call_seconds(c, base, False, hw), 1e-12)
            for s in schemes:
                if s.composes_with_compile:
                    table[(n, s.name, True)] = anchor * roofline_call_seconds(c, s, True, hw)
    return table


def host_link(hw: Hardware, remeasure: bool = False) -> float | None:
    """Pinned host-to-device bytes per second on the running GPU (what block streaming and swapping
    copy over), measured once and cached per device; None off a GPU. 256 MiB copies, median of five:
    the H200 moved 51.6 GB/s this way (docs/measurements.md), where the table says 50."""
    if hw.device != "cuda" or not torch.cuda.is_available():
        return None
    path = cache.folder("link") / (cache.key({"device": device_label(), "torch": torch.__version__}) + ".json")
    stored = None if remeasure else cache.read_json(path)
    if isinstance(stored, dict) and isinstance(stored.get("bytes_per_s"), (int, float)) and stored["bytes_per_s"] > 0:
        return float(stored["bytes_per_s"])
    n = 256 << 20
    src = torch.empty(n, dtype=torch.uint8).pin_memory()
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)  # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    rate = n / statistics.median(times)
    cache.write_json(path, {"bytes_per_s": rate, "device": device_label()})
    return rate
