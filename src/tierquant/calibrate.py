"""Per-call times on the running device, from micro-benchmarks of a component's real Linear shapes.

The planner stays pure: this module measures and hands it a table
    {(component, scheme, compiled): seconds per call}
cached on disk by device (`hardware.device_label`), library versions and shapes, so a second plan
costs nothing and a table measured on one card is never used for another.
A component's call = its non-Linear work (measured in the profile when it was made on this
device, else a roofline estimate) + the sum over its Linear layers of the measured layer time.
"""
from __future__ import annotations

import json
import statistics
import time

import torch
from torch import nn

from . import cache
from .backends import quantize
from .cost import roofline_call_seconds
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


def _time(fn, device: str, reps: int) -> float:
    for _ in range(2):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def bench_linear(in_f: int, out_f: int, rows: int, scheme: str, device: str) -> float:
    """Seconds for one bf16 (rows x in) @ (in x out) under `scheme` on `device`, eager."""
    layer = nn.Sequential(nn.Linear(in_f, out_f, dtype=torch.bfloat16, device=device))
    quantize(layer, scheme)
    x = torch.randn(rows, in_f, dtype=torch.bfloat16, device=device)
    return _time(lambda: layer(x), device, reps=10 if device == "cuda" else 5)


def timings_for(profile: Profile, hw: Hardware, catalog: dict[str, Scheme] | None = None,
                force: bool = False) -> dict | None:
    """Measured per-call times for every component and runnable scheme, or None where the device
    cannot afford the benchmarks (full-size shapes on a CPU) and the roofline should answer."""
    catalog = catalog or CATALOG
    schemes = [s for s in catalog.values() if not s.available_on(hw)]
    if BASELINE not in [s.name for s in schemes]:
        schemes.insert(0, CATALOG[BASELINE])
    shapes = {n: _shapes(c) for n, c in profile.components.items()}
    work = sum(2 * i * o * r * k for s in shapes.values() for (i, o, r), k in s.items())
    if hw.device == "cpu" and work > CPU_BENCH_FLOPS and not force:
        return None
    here = device_label()
    path = cache.folder("timings") / (cache.key({"device": here, "versions": _versions(),
                                                 "schemes": [s.name for s in schemes],
                                                 "shapes": sorted({k for s in shapes.values() for k in s})}) + ".json")
    stored = cache.read_json(path)
    try:
        layer_t = {tuple(json.loads(k)): float(v) for k, v in stored.items()}
        if any((*shape, s.name, False) not in layer_t for sh in shapes.values() for shape in sh for s in schemes):
            raise ValueError("incomplete")
    except (AttributeError, TypeError, ValueError):  # missing or damaged: measure again
        layer_t = _measure(shapes, schemes, hw)
        cache.write_json(path, {json.dumps(list(k)): v for k, v in layer_t.items()})
    return _assemble(profile, hw, schemes, shapes, layer_t, here)


def _measure(shapes, schemes, hw) -> dict:
    device = "cuda" if hw.device == "cuda" else "cpu"
    uniq = sorted({k for s in shapes.values() for k in s})
    out = {}
    try:
        from rich.progress import track
    except ImportError:  # pragma: no cover
        track = lambda it, **_: it  # noqa: E731
    jobs = [(shape, s.name) for shape in uniq for s in schemes]
    for (i, o, r), name in track(jobs, description="Measuring layer shapes", transient=True):
        out[(i, o, r, name, False)] = bench_linear(i, o, r, name, device)
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


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
            # Non-Linear work (attention, norms, convolutions) from the roofline: the bf16 call less
            # what its Linear layers would take at the same rate.
            full = roofline_call_seconds(c, base, False, hw)
            frac = 1 - min(c.linear_flops_per_call / c.flops_per_call, 1.0) if c.flops_per_call else 1.0
            other = full * frac
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
