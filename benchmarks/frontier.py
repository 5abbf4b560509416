#!/usr/bin/env python3
"""The frontier benchmark (CUDA, no network): every budget x every strategy, each in a fresh process
under a hard cap.

On the lent GPU machine (wheels carried in .whl; see benchmarks/gpu.sh):
    python3 benchmarks/frontier.py --pipelines flux-dev --budgets 24,16,12,8,none --out $OUT
    tierquant bench --pipelines flux-dev --budgets 24 --strategies tiered,seed-recipe   (the same, from a checkout)
Here, to make the committed table and plot from the rows that came back:
    python3 benchmarks/frontier.py --report benchmarks/results/h200/rows.jsonl --out benchmarks/results/h200

Strategies:
  diffusers-offload  bf16 with enable_model_cpu_offload(), or group offloading where that cannot fit
  diffusers-nf4      what a diffusers user would try: bitsandbytes NF4 (Linear4bit, as a PipelineQuantizationConfig
                     makes it) on the transformer and the T5 encoder, enable_model_cpu_offload(), regional
                     compilation where it runs
  diffusers-fp8-offload  torchao FP8 (dynamic, row-wise) transformer with diffusers group offloading (block
                     level, with a stream); a failure is recorded as the row's error
  seed-recipe        the published Flux recipe: transformer fp8-dynamic + regional compile, T5 nf4,
                     the rest bf16, all resident (only where it fits)
  uniform:<scheme>   one scheme for every component, resident, compiled where the scheme allows
  tiered             tierquant.plan for that budget on this device, applied with tierquant.apply
  tiered+MOD[+MOD]   the same plan with an engine change, to compare in one job: `staged` or `per-tensor`
                     (streaming.STAGE on or off: streamed blocks copied whole into a window slot, the
                     default, or tensor by tensor; `tiered-staged` is `tiered+staged`), `gc-frozen` (after
                     the first image, gc.collect() then gc.freeze(): later collections skip everything
                     made so far), `even` (the planner spreads streamed blocks evenly by count only, not
                     also by compute: the plans before 04fafa7)

Each run appends a row to rows.jsonl in --out; `--report` turns rows into frontier.json, a Markdown
table and a PNG plot.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GiB = 1024**3
TRACE_STEPS = 4  # a traced image's denoising steps (`--trace`): enough for a step's copies to carry over
DEFAULT_STRATEGIES = ["tiered", "seed-recipe", "diffusers-offload", "diffusers-nf4", "diffusers-fp8-offload", "uniform:bf16", "uniform:fp8-dynamic",
                      "uniform:int8-weight", "uniform:nf4"]


def _versions() -> dict:
    out = {}
    for mod in ("torch", "diffusers", "transformers", "torchao", "bitsandbytes", "tierquant"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


def _call_kwargs(name: str, steps: int | None, size: int | None) -> dict:
    from tierquant.pipelines.builtin import default_call

    kw = dict(default_call(name))
    if steps:
        kw["num_inference_steps"] = steps
    if size:
        kw["height"] = kw["width"] = size
    kw["output_type"] = "latent" if kw.get("output_type") == "latent" else "pil"
    return kw


def _hand_plan(profile, choices: dict, budget_bytes: int):
    """A Plan made by hand (the seed recipe, uniform schemes), priced by the planner's cost model."""
    from tierquant.hardware import detect
    from tierquant.plan import Choice, Plan

    comps = {n: Choice(scheme=s, placement="resident", compile=c) for n, (s, c) in choices.items()}
    return Plan(components=comps, predicted_latency_s=0.0, predicted_peak_bytes=0, budget_bytes=budget_bytes,
                hardware=detect().to_dict(), pipeline=profile.fingerprint(), steps=profile.steps)


def _strategy_plan(strategy: str, name: str, profile, budget_bytes: int):
    """The plan a strategy runs, with the planner's prediction for it, or (None, why) where it has none
    (the seed recipe is Flux's) or cannot fit (predicted peak over the budget)."""
    from tierquant.calibrate import timings_for
    from tierquant.hardware import detect, usable_budget
    from tierquant import plan as make
    from tierquant.cost import price
    from tierquant.schemes import CATALOG

    comps = list(profile.components)
    if strategy.startswith("tiered"):
        return make(profile, budget=budget_bytes), None
    if strategy == "seed-recipe":
        if name != "flux-dev":
            return None, "the published recipe is for flux-dev"
        choice = {n: ("bf16", False) for n in comps}
        choice["transformer"] = ("fp8-dynamic", True)
        choice["text_encoder_2"] = ("nf4", False)
    elif strategy.startswith("uniform:"):
        s = CATALOG[strategy.split(":", 1)[1]]
        choice = {n: (s.name, s.composes_with_compile and c.calls > 1 and bool(c.repeated_blocks))
                  for n, c in profile.components.items()}
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    hw = detect()
    latency, peak = price(profile, hw, {n: (s, "resident", c) for n, (s, c) in choice.items()},
                          timings_for(profile, hw))
    if peak > usable_budget(budget_bytes, hw):
        return None, f"does not fit: predicted peak {peak / GiB:.1f} GiB"
    plan = _hand_plan(profile, choice, budget_bytes)
    plan.predicted_latency_s, plan.predicted_peak_bytes = latency, peak
    return plan, None


def _diffusers_user(pipe, strategy: str) -> str:
    """Set up `pipe` the way a diffusers user would for `strategy`; returns how."""
    import torch

    from tierquant.applier import BudgetGuard, quantize_component
    from tierquant.plan import Choice

    cuda = torch.device("cuda")
    guard = BudgetGuard(cuda, 1 << 62)
    if strategy == "diffusers-nf4":
        for name in ("transformer", "text_encoder_2", "text_encoder_3"):
            if getattr(pipe, name, None) is not None and type(getattr(pipe, name)).__name__ != "CLIPTextModelWithProjection":
                # quantized on the GPU unit by unit, left on the host for the offload hooks to move
                quantize_component(getattr(pipe, name), Choice("nf4", "swapped", False), cuda, guard, lambda: None)
        pipe.enable_model_cpu_offload()
        try:
            pipe.transformer.compile_repeated_blocks()
            return "bitsandbytes nf4 transformer + T5, enable_model_cpu_offload, compile_repeated_blocks"
        except Exception as e:  # noqa: BLE001 - a user would run it uncompiled
            return f"bitsandbytes nf4 transformer + T5, enable_model_cpu_offload (compile failed: {type(e).__name__})"
    quantize_component(pipe.transformer, Choice("fp8-dynamic", "swapped", False), cuda, guard, lambda: None)
    pipe.enable_group_offload(onload_device=cuda, offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    return "torchao fp8-dynamic transformer, enable_group_offload(block_level, use_stream)"


def _modifiers(strategy: str) -> set[str]:
    """The engine changes a tiered strategy names: `tiered+staged+gc-frozen` -> {staged, gc-frozen}."""
    if strategy == "tiered-staged":
        return {"staged"}
    mods = set(strategy.split("+")[1:]) if strategy.startswith("tiered+") else set()
    unknown = mods - {"staged", "per-tensor", "gc-frozen", "even"}
    if unknown:  # a misspelt change would run the default engine under the name of another
        raise ValueError(f"unknown engine change(s) {sorted(unknown)} in {strategy!r}: "
                         "use staged, per-tensor, gc-frozen, even")
    return mods


_T0 = time.perf_counter()


def _stage(what: str) -> None:
    """Progress on stdout, so a run cut short still says where its time went."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {what}", flush=True)


def _load_compile_artifacts(folder: Path) -> int:
    """Load torch's portable compile artifacts saved by earlier runs (on this or another machine)."""
    import torch

    n = 0
    for f in sorted(folder.glob("*.bin")) if folder.is_dir() else []:
        try:
            torch.compiler.load_cache_artifacts(f.read_bytes())
            n += 1
        except Exception as e:  # noqa: BLE001 - a stale cache only costs a cold compile
            print(f"ignoring compile artifacts {f.name}: {e}", flush=True)
    return n


def _save_compile_artifacts(folder: Path, tag: str) -> None:
    import torch

    got = torch.compiler.save_cache_artifacts()
    if got:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{tag}.bin").write_bytes(got[0])


def run_one(spec: dict) -> dict:
    """One (pipeline, budget, strategy) run in this process. Returns a result row."""
    import torch

    from tierquant.hardware import detect
    from tierquant.pipelines.builtin import build, profile_builtin
    from tierquant.profile import Profile

    name, strategy, budget_gib = spec["pipeline"], spec["strategy"], spec.get("budget_gib")
    card = torch.cuda.get_device_name(0)
    row = {"pipeline": name, "budget_gib": budget_gib, "strategy": strategy, "card": card, "oom": False,
           "seconds_per_image": None, "peak_reserved_bytes": None, "setup_s": None, "first_image_s": None,
           "predicted_latency_s": None, "predicted_peak_bytes": None, "versions": _versions(),
           "date": time.strftime("%Y-%m-%d")}
    total = torch.cuda.get_device_properties(0).total_memory
    budget_bytes = int(budget_gib * GiB) if budget_gib else total
    if budget_gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total))
    kw = _call_kwargs(name, spec.get("steps"), spec.get("size"))
    artifacts = Path(spec["artifacts"]) if spec.get("artifacts") else None
    row["compile_artifacts_loaded"] = _load_compile_artifacts(artifacts) if artifacts else 0
    prof_path = spec.get("profile")
    prof = Profile.load(prof_path) if prof_path and Path(prof_path).exists() else profile_builtin(name)
    prof = with_block_flops(prof, name).scaled(kw["num_inference_steps"])
    try:
        t0 = time.perf_counter()
        if strategy in ("diffusers-nf4", "diffusers-fp8-offload"):
            _stage("building on the CPU")
            pipe = build(name, device="cpu", dtype=torch.bfloat16)
            row["how"] = _diffusers_user(pipe, strategy)
        elif strategy == "diffusers-offload":
            _stage("building on the CPU")
            pipe = build(name, device="cpu", dtype=torch.bfloat16)
            biggest = max(c.params * 2 + c.activation_peak_bytes for c in prof.components.values())
            if biggest * 1.1 < budget_bytes:
                pipe.enable_model_cpu_offload()
                row["how"] = "enable_model_cpu_offload"
            else:
                pipe.enable_group_offload(onload_device=torch.device("cuda"), offload_type="block_level",
                                          num_blocks_per_group=1, use_stream=True)
                row["how"] = "enable_group_offload(block_level, use_stream)"
        else:
            from tierquant import streaming
            from tierquant.applier import apply

            mods = _modifiers(strategy)
            if mods & {"staged", "per-tensor"}:  # else the library's default engine
                streaming.STAGE = "staged" in mods
            if "even" in mods:  # the planner as before 04fafa7: streamed blocks spread evenly by count only
                from tierquant import cost

                cost.spread_by_compute = lambda *args: []
            _stage("planning")
            plan, why_not = _strategy_plan(strategy, name, prof, budget_bytes)
            if plan is None:
                row["skipped"] = why_not
                return row
            row["predicted_latency_s"] = plan.predicted_latency_s
            row["predicted_peak_bytes"] = plan.predicted_peak_bytes
            row["host_bytes_planned"] = plan.host_bytes
            row["plan"] = {n: f"{c.scheme}/{c.placement}{'+compile' if c.compile else ''}"
                           for n, c in plan.components.items()}
            # what a streamed plan's speed and memory depend on (the host link is measured there)
            row["streaming"] = {n: {"resident_blocks": c.resident_blocks, "prefetch": c.prefetch, "tiled": c.tiled,
                                    "streamed": c.streamed}
                                for n, c in plan.components.items() if c.placement == "streamed"}
            row["free_between_phases"] = plan.free_between_phases
            row["plan_notes"] = list(plan.notes)
            row["timing_flags"] = _timing_flags()
            _stage("building on the CPU")
            pipe = build(name, device="cpu", dtype=torch.bfloat16)
            _stage("applying the plan")
            pipe = apply(pipe, plan, device="cuda", progress=False)
        torch.cuda.synchronize()
        row["setup_s"] = time.perf_counter() - t0
        gen = lambda seed: pipe(**kw, generator=torch.Generator("cpu").manual_seed(seed))  # noqa: E731
        _stage("first image (compiles)")
        t1 = time.perf_counter()
        gen(0)
        torch.cuda.synchronize()
        row["first_image_s"] = time.perf_counter() - t1
        from tierquant.compilation import compile_stats

        row["compile"] = compile_stats()  # where the first image's compiling went
        if "gc-frozen" in _modifiers(strategy):
            import gc

            gc.collect()
            gc.freeze()
            row["gc_frozen_objects"] = gc.get_freeze_count()
        if artifacts:
            _save_compile_artifacts(artifacts, f"{name}-{budget_gib}-{strategy.replace(':', '_')}")
        _stage("timed images")
        streamers = getattr(pipe, "_tierquant_streamers", {}) or {}
        before = {n: (st.host_s, st.loads) for n, st in streamers.items()}
        times, phases = [], _PhaseClock(pipe)
        row["phase_ms"], row["copies"] = [], []
        from tierquant.streaming import LoadClock

        for st in streamers.values():
            st.clock = LoadClock()
        row["image_started_at"] = []  # wall-clock, to read beside the job's clocks.csv
        for seed in range(1, 1 + spec.get("images", 3)):
            phases.begin()
            row["image_started_at"].append(time.time())
            t = time.perf_counter()
            gen(seed)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            row["phase_ms"].append(phases.end())
            # per image and streamed component: the copies' rate, and what of them the compute waited for
            row["copies"].append({n: st.clock.read() for n, st in streamers.items()})
        for st in streamers.values():
            st.clock = None
        phases.remove()
        row["seconds_per_image"] = statistics.median(times)
        row["times"] = times
        # Where a slow image loses its time: every denoiser step of the last image (all slower, or some).
        row["denoiser_step_ms"] = phases.step_ms
        # the host's share of streaming: if it nears the image time, the host, not the link, sets the pace
        row["streaming_host"] = {n: {"host_s_per_image": (st.host_s - before[n][0]) / len(times),
                                     "blocks_loaded_per_image": (st.loads - before[n][1]) / len(times),
                                     "unpinned_bytes": st.unpinned_bytes}
                                 for n, st in streamers.items()}
        if spec.get("trace"):  # one more, short image under the profiler: where the copy engine sat idle
            import copy_trace

            _stage("traced image")
            short = {**kw, "num_inference_steps": min(kw["num_inference_steps"], TRACE_STEPS)}
            path = Path(spec["trace"]) / f"trace-{name}-{budget_gib}-{strategy.replace(':', '_')}.json.gz"
            trace = copy_trace.record(lambda: pipe(**short, generator=torch.Generator("cpu").manual_seed(1)), path)
            row["trace"] = {"file": path.name, "steps": short["num_inference_steps"], **copy_trace.summary(trace)}
        stats = torch.cuda.memory_stats()
        # retries free the cache and synchronise the device; many device allocations mean churn
        row["allocator"] = {k: stats.get(k) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free",
                                                       "num_sync_all_streams", "num_ooms")}
    except torch.OutOfMemoryError as e:
        row["oom"] = True
        row["error"] = str(e).splitlines()[0][:300]
    except Exception as e:  # noqa: BLE001 - a benchmark row records what went wrong and moves on
        row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        row["traceback"] = traceback.format_exc()[-3000:]
    row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    # Reserved memory grows to the cap once the caching allocator has freed blocks of other sizes (it
    # gives them back only when an allocation fails there); allocated is what was in use at once.
    row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    # The host's side, after the images: the pinned copies of streamed and swapped blocks (against the
    # plan's host_bytes: torch's pinned allocator may round each buffer up) and what else the process
    # holds; the peak was the pipeline built on the host in bf16.
    row["host_rss_bytes"] = _rss_bytes()
    row["host_pinned_bytes"] = _pinned_bytes()
    row["hardware"] = detect().name
    return row


def with_block_flops(prof, name: str):
    """`prof` with each stream block's FLOPs where it lacks them (a GPU profile from before profile
    version 4) taken from the built-in's profile on meta: FLOPs depend on shapes, not on the device,
    and the cost model shares a call among blocks by them."""
    from dataclasses import replace

    from tierquant.pipelines.builtin import profile_builtin

    if all(c.block_flops or not c.blocks for c in prof.components.values()):
        return prof
    shapes = profile_builtin(name, progress=False).components
    comps = {n: replace(c, block_flops=shapes[n].block_flops)
             if not c.block_flops and n in shapes and len(shapes[n].block_flops) == len(c.blocks) else c
             for n, c in prof.components.items()}
    return replace(prof, components=comps)


def _timing_flags() -> dict:
    """The layer timings that disagreed with the roofline twice and were estimated instead (the
    device's cached table, `calibrate.timings_for`): shape and scheme -> why. A plan's prediction
    leans on those estimates, and which shapes they are says whether the machine or the model is off."""
    from tierquant import cache

    flags = {}
    for path in sorted(cache.folder("timings").glob("*.json")):
        table = cache.read_json(path)
        if isinstance(table, dict) and isinstance(table.get("flags"), dict):
            flags.update(table["flags"])
    return flags


def _pinned_bytes() -> dict:
    """Page-locked host memory: what tierquant locked at exact sizes (`pinned.py`), and what torch's
    pinned allocator holds (its requests rounded up to powers of two)."""
    import torch

    from tierquant import pinned

    stats = getattr(torch.cuda, "host_memory_stats", lambda: {})()
    return {"exact": pinned.registered_bytes(),
            "torch_allocator": {k: v for k, v in stats.items() if "bytes" in k and k.endswith(".current")},
            "fallbacks": pinned.fallbacks()[:20]}


def _rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


CLOCK_HOOK = "frontier-phase-clock"


class _Marks:
    """A component's start and end marks around a hooked method's whole call: a `tierquant.hooks.Hook`
    by its `around` (this module imports tierquant only inside its functions)."""

    def __init__(self, clock: "_PhaseClock", name: str):
        self.clock, self.name = clock, name

    def around(self, call, obj, method, args, kwargs):
        self.clock._mark(self.name, 0)
        try:
            return call(*args, **kwargs)
        finally:
            self.clock._mark(self.name, 1)


class _PhaseClock:
    """Where each image's time goes, by component: CUDA events and the host clock around every call of
    each component, read after the image. A component's window holds what its placement does around
    the call (a phase switch, loading its weights): the clock's marks are the outermost hook (`_Marks`)
    on its `forward` or, for a VAE, which pipelines call through `vae.decode` (tiles and all), on
    `decode`. `gpu` is each
    component's GPU time from its calls' starts to their ends; `other` is what none covers (scheduler,
    phase switches, the GPU waiting for the host); `host` is the host's time inside the calls; `gc_ms`
    is the host's time in Python's garbage collector during the image, by generation (a pause there
    stalls the copies a streamed plan issues ahead of the GPU); `steps`: the GPU time from one denoiser
    call's start (the transformer or UNet) to the next (`step_ms`: the last image's).

    `other` split: `gaps` is the time between one component's window and the next ("start>text_encoder",
    "transformer>transformer" summed over the steps, "vae>end"), on the GPU and on the host, and how
    many. `lead_ms` is how far the host ran ahead of the GPU at each component's first call and at each
    denoiser step: a mark's GPU time less its host time, both from the image's start, which the GPU
    reaches at once (the clock synchronises first). Near 0, the GPU was waiting for the host there; a
    stretch of slow steps with leads near 0 is the host's, with a lead of tens of ms the GPU's.
    `reserved_gib`: the allocator's reserved memory at the end of each component's last call (reserved
    memory only grows between cache releases, so about its phase's peak), to set beside the plan's
    phase peaks. `allocator`: device allocations and frees during the image (each cudaFree waits for
    the GPU to finish everything queued)."""

    def __init__(self, pipe):
        import gc

        import torch

        self.marks, self.gc, self._gc_start, self.step_ms = [], {}, None, []
        gc.callbacks.append(self._on_gc)
        den = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        self.denoiser = next((n for n, c in (getattr(pipe, "components", None) or {}).items() if c is den), None)
        from tierquant.hooks import add_hook

        self.hooked = []
        for name, comp in (getattr(pipe, "components", None) or {}).items():
            if not isinstance(comp, torch.nn.Module):
                continue
            method = "decode" if name.startswith("vae") and callable(getattr(comp, "decode", None)) else "forward"
            add_hook(comp, CLOCK_HOOK, _Marks(self, name), [method], outer=True)
            self.hooked.append(comp)

    def _mark(self, name, end):
        import torch

        e = torch.cuda.Event(enable_timing=True)
        e.record()
        t = time.perf_counter()
        self.marks.append((name, end, e, t, torch.cuda.memory_reserved() if end else None))

    def _on_gc(self, phase, info):
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start is not None:
            g = str(info.get("generation"))
            self.gc[g] = self.gc.get(g, 0.0) + 1e3 * (time.perf_counter() - self._gc_start)
            self._gc_start = None

    @staticmethod
    def _device_calls() -> dict:
        import torch

        stats = torch.cuda.memory_stats()
        return {k: stats.get(f"num_device_{k}", 0) for k in ("alloc", "free")}

    def begin(self):
        import torch

        torch.cuda.synchronize()  # the image's start mark runs at once: the anchor of `lead_ms`
        self.marks, self.gc = [], {}
        self._calls = self._device_calls()
        self._mark("image", 0)

    def end(self) -> dict:
        self._mark("image", 1)
        import torch

        torch.cuda.synchronize()
        gpu, host, open_, windows, reserved = {}, {}, {}, [], {}
        for name, end, e, t, r in self.marks:
            if not end:
                open_[name] = (e, t)
            elif name in open_:
                e0, t0 = open_.pop(name)
                gpu[name] = gpu.get(name, 0.0) + e0.elapsed_time(e)
                host[name] = host.get(name, 0.0) + 1e3 * (t - t0)
                windows.append((name, e0, t0, e, t))
                reserved[name] = r
        starts = [e for name, end, e, *_ in self.marks if name == self.denoiser and not end]
        self.step_ms = [round(a.elapsed_time(b), 2) for a, b in zip(starts, starts[1:])]
        total = gpu.pop("image", 0.0)
        host.pop("image", None)
        reserved.pop("image", None)
        image = next(w for w in windows if w[0] == "image")
        _, anchor, t_anchor, _, _ = image
        lead = lambda e, t: round(anchor.elapsed_time(e) - 1e3 * (t - t_anchor), 2)  # noqa: E731
        calls = [w for w in windows if w[0] != "image"]
        calls.sort(key=lambda w: w[2])  # in the order the host made them
        # between windows: ("start", the image's start) ... ("end", its end)
        seq = [("start", None, None, image[1], image[2])] + calls + [("end", image[3], image[4], None, None)]
        gaps = {}
        for (a, _, _, e_a, t_a), (b, e_b, t_b, _, _) in zip(seq, seq[1:]):
            g = gaps.setdefault(f"{a}>{b}", {"gpu_ms": 0.0, "host_ms": 0.0, "n": 0})
            g["gpu_ms"] += e_a.elapsed_time(e_b)
            g["host_ms"] += 1e3 * (t_b - t_a)
            g["n"] += 1
        first = {}
        for name, e0, t0, *_ in calls:
            first.setdefault(name, lead(e0, t0))
        calls_now = self._device_calls()
        return {"gpu": {n: round(v, 1) for n, v in gpu.items()}, "other": round(total - sum(gpu.values()), 1),
                "total": round(total, 1), "host": {n: round(v, 1) for n, v in host.items()},
                "gc_ms": {g: round(v, 1) for g, v in self.gc.items()}, "steps": self.step_ms,
                "gaps": {k: {"gpu_ms": round(v["gpu_ms"], 2), "host_ms": round(v["host_ms"], 2), "n": v["n"]}
                         for k, v in gaps.items()},
                "lead_ms": {"first_call": first,
                            "steps": [lead(e0, t0) for name, e0, t0, *_ in calls if name == self.denoiser],
                            "end": lead(image[3], image[4])},
                "reserved_gib": {n: round(r / 2**30, 3) for n, r in reserved.items() if r is not None},
                "allocator": {k: calls_now[k] - self._calls[k] for k in calls_now}}

    def remove(self):
        import gc

        from tierquant.hooks import remove_hook

        for comp in self.hooked:
            remove_hook(comp, CLOCK_HOOK)
        gc.callbacks.remove(self._on_gc)


def profile_job(spec: dict) -> dict:
    """Measure the real profile of a full-size random-init pipeline on this GPU (bf16, unlimited)."""
    import torch

    from tierquant.profiler import profile
    from tierquant.pipelines.builtin import build

    name = spec["pipeline"]
    kw = _call_kwargs(name, 2, spec.get("size"))
    pipe = build(name, device="cuda", dtype=torch.bfloat16)
    profile(pipe, **kw)  # warm-up: kernels, cuBLAS handles
    prof = profile(pipe, **kw)
    prof.save(spec["profile"])
    del pipe
    torch.cuda.empty_cache()
    # Layer micro-benchmarks once, here, into the on-disk cache every later run reads.
    from tierquant.calibrate import timings_for
    from tierquant.hardware import detect

    timings_for(prof.scaled(28), detect())
    return {"pipeline": name, "profile": spec["profile"], "components": {n: c.calls for n, c in prof.components.items()}}


def _spawn(spec: dict, out: Path, timeout: int) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        p = None
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    else:
        stdout, stderr = p.stdout, p.stderr
    (out / "logs").mkdir(exist_ok=True, parents=True)
    tag = f"{spec['pipeline']}-{spec.get('budget_gib')}-{spec['strategy'].replace(':', '_')}"
    (out / "logs" / f"{tag}.log").write_text(stdout[-20000:] + "\n--- stderr ---\n" + stderr[-20000:])
    if p is None:
        stages = [l for l in stdout.splitlines() if l.startswith("[")]
        return {**spec, "error": f"timed out after {timeout} s (last: {stages[-1] if stages else '?'})", "oom": False}
    for line in reversed(stdout.splitlines()):
        if line.startswith("ROW "):
            row = json.loads(line[4:])
            row["wall_s"] = time.perf_counter() - t0
            return row
    return {**spec, "error": f"exit {p.returncode}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}",
            "oom": "OutOfMemory" in stderr}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tierquant bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--pipelines", default="flux-dev", help="built-in pipelines, comma-separated")
    ap.add_argument("--budgets", default="24,16,12,8,none", help="GiB, comma-separated; 'none' = unlimited")
    ap.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES), help="strategies, comma-separated (see above)")
    ap.add_argument("--images", type=int, default=3, help="timed images per run (after one warm-up)")
    ap.add_argument("--steps", type=int, help="override the pipeline's step count")
    ap.add_argument("--size", type=int, help="override height and width")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="folder for rows.jsonl, logs and profiles")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run")
    ap.add_argument("--deadline", type=float, default=0, help="stop starting runs after this many seconds")
    ap.add_argument("--artifacts", help="folder of torch compile artifacts to load before and save after each run")
    ap.add_argument("--report", nargs="*", help="rows.jsonl files to turn into frontier.json, .md and .png")
    ap.add_argument("--trace", action="store_true",
                    help=f"after the timed images, trace one {TRACE_STEPS}-step image (torch.profiler) into --out: "
                         "where the host-to-device copies paused, and whether the host was late (copy_trace.py)")
    args = ap.parse_args(argv)

    if args.one:
        spec = json.loads(args.one)
        row = profile_job(spec) if spec["strategy"] == "profile" else run_one(spec)
        print("ROW " + json.dumps(row), flush=True)
        return 0
    if args.report is not None:
        from frontier_report import write_report

        write_report([Path(p) for p in args.report], Path(args.out))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("error: tierquant bench needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    start = time.perf_counter()
    for name in args.pipelines.split(","):
        prof_path = str(out / f"profile-{name}.json")
        if any(s.startswith("tiered") for s in args.strategies.split(",")) and not Path(prof_path).exists():
            r = _spawn({"pipeline": name, "strategy": "profile", "profile": prof_path, "size": args.size}, out,
                       args.timeout)
            print("profile:", json.dumps(r)[:300], flush=True)
        for b in args.budgets.split(","):
            budget = None if b.strip().lower() in ("none", "unlimited", "") else float(b)
            for strategy in args.strategies.split(","):
                if args.deadline and time.perf_counter() - start > args.deadline:
                    print(f"deadline reached; skipping {name} {b} {strategy}", flush=True)
                    continue
                spec = {"pipeline": name, "budget_gib": budget, "strategy": strategy, "images": args.images,
                        "steps": args.steps, "size": args.size, "profile": prof_path, "artifacts": args.artifacts,
                        "trace": str(out) if args.trace else None}
                row = _spawn(spec, out, args.timeout)
                with rows_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                sp = row.get("seconds_per_image")
                print(f"{name:10} {str(budget):>5} {strategy:22} "
                      f"{(f'{sp:.2f} s/img' if sp else 'OOM' if row.get('oom') else row.get('skipped') or (row.get('error') or '')[:60])}"
                      f"  peak {(row.get('peak_reserved_bytes') or 0) / GiB:.1f} GiB"
                      f"  pred {row.get('predicted_latency_s') or 0:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
