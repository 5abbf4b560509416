"""The benchmark's report path (CPU): committed results are well-formed and re-render."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCH / "results"
_spec = importlib.util.spec_from_file_location("frontier_report", BENCH / "frontier_report.py")
frontier_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(frontier_report)
KEYS, write_report = frontier_report.KEYS, frontier_report.write_report


def test_committed_frontier_rows_have_the_documented_keys():
    files = list(RESULTS.glob("*/frontier.json"))
    assert files
    for f in files:
        rows = json.loads(f.read_text())["rows"]
        assert rows
        for r in rows:
            assert set(KEYS) <= set(r), f"{f}: {set(KEYS) - set(r)}"
            assert r["card"]


def test_report_renders_rows_to_json_and_markdown(tmp_path):
    rows = RESULTS / "h200" / "rows.jsonl"
    write_report([rows], tmp_path)
    md = (tmp_path / "frontier.md").read_text()
    assert "| flux-dev | 24.0 | tiered |" in md
    assert len(json.loads((tmp_path / "frontier.json").read_text())["rows"]) == len(rows.read_text().splitlines())


def test_the_phase_clock_splits_an_image_by_component(monkeypatch):
    """frontier.py's _PhaseClock on a tiny Flux, with CUDA's events played by the host clock: every
    component's calls are timed, a placement's hooks around them included (the VAE through its whole
    `decode`), and nothing is counted twice."""
    import sys
    import time

    import torch

    from tierquant.pipelines.tiny import tiny_flux, tiny_flux_call

    class Event:  # torch.cuda.Event's two methods used, on the host clock
        def __init__(self, enable_timing=True):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, other):
            return 1e3 * (other.t - self.t)

    reserved = iter(range(1, 10**6))  # the allocator's reserved bytes: one more at every reading
    device_calls = iter(range(0, 10**6, 5))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: next(reserved) * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda *a: dict.fromkeys(
        ("num_device_alloc", "num_device_free"), next(device_calls)))
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("frontier", None)
    import frontier

    from tierquant.hooks import Hook, HookRegistry, add_hook, remove_hook

    class Switch(Hook):  # a placement's outermost hook on the VAE (a phase switch, a load): 30 ms
        def pre_call(self, obj, method, args, kwargs):
            time.sleep(0.03)
            return args, kwargs

    pipe = tiny_flux(seed=0)
    add_hook(pipe.vae, "phase", Switch(), ["forward", "decode"], outer=True)
    clock = frontier._PhaseClock(pipe)
    clock.begin()
    pipe(**tiny_flux_call(seed=0))
    import gc

    gc.collect()  # the clock sees the collector's pauses
    got = clock.end()
    clock.remove()
    assert got["gc_ms"].get("2", 0) > 0 and clock._on_gc not in gc.callbacks
    assert set(got["gpu"]) == {"text_encoder", "text_encoder_2", "transformer", "vae"}
    assert all(v > 0 for v in got["gpu"].values())
    assert got["other"] >= 0 and got["total"] >= sum(got["gpu"].values())
    assert got["gpu"]["vae"] >= 30  # the placement's work around the decode is the VAE's, not "other"
    steps = tiny_flux_call(seed=0)["num_inference_steps"]
    assert len(clock.step_ms) == steps - 1 and all(ms > 0 for ms in clock.step_ms)  # denoiser start to start
    # "other", split between the windows, in the order the pipeline calls its components
    gaps = got["gaps"]
    assert abs(sum(g["gpu_ms"] for g in gaps.values()) - got["other"]) < 0.5
    assert list(gaps)[0] == "start>text_encoder" and list(gaps)[-1] == "vae>end"
    assert gaps["transformer>transformer"]["n"] == steps - 1 and gaps["transformer>vae"]["n"] == 1
    assert all(g["gpu_ms"] >= 0 and g["host_ms"] >= 0 for g in gaps.values())
    # the host clock plays the GPU's here, so the host is never ahead: every lead is about 0
    lead = got["lead_ms"]
    assert set(lead["first_call"]) == set(got["gpu"]) and len(lead["steps"]) == steps
    assert all(abs(v) < 1 for v in [*lead["first_call"].values(), *lead["steps"], lead["end"]])
    # reserved memory at each component's last call's end: read later for later components
    r = got["reserved_gib"]
    assert set(r) == set(got["gpu"]) and r["text_encoder"] < r["text_encoder_2"] < r["transformer"] < r["vae"]
    assert got["allocator"] == {"alloc": 5, "free": 5}  # counted over the image (begin to end)
    n = len(clock.marks)
    pipe(**tiny_flux_call(seed=0))  # the hooks are removed: no more marks
    assert len(clock.marks) == n
    assert "phase" in HookRegistry.of(pipe.vae) and frontier.CLOCK_HOOK not in HookRegistry.of(pipe.vae)
    remove_hook(pipe.vae, "phase")


def test_a_rows_host_readings_work_on_any_machine(monkeypatch):
    """What `run_one` records after the images, outside its try (a failure there loses the whole row:
    on 2026-12-06 a missing import cost every row of a GPU call): the host's resident memory and its
    page-locked bytes, tierquant's own (exact, here on a faked CUDA runtime) beside torch's allocator's."""
    import sys

    import torch

    from tierquant import pinned

    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("frontier", None)
    import frontier

    class Cudart:
        class cudaError:
            success = 0

        def cudaHostRegister(self, ptr, size, flags):
            return 0

        def cudaHostUnregister(self, ptr):
            return 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart())
    before = frontier._pinned_bytes()
    buf, locked = pinned.empty(3 * 2**20)
    after = frontier._pinned_bytes()
    assert locked and after["exact"] - before["exact"] == 3 * 2**20
    assert isinstance(after["torch_allocator"], dict)
    assert frontier._rss_bytes() > 3 * 2**20
    del buf


def test_a_row_names_the_layer_timings_that_were_estimated(monkeypatch, tmp_path):
    """`frontier._timing_flags` reads the flagged entries of the device's cached timing tables."""
    import sys

    from tierquant import cache

    monkeypatch.setenv("TIERQUANT_CACHE", str(tmp_path))
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("frontier", None)
    import frontier

    assert frontier._timing_flags() == {}
    cache.write_json(cache.folder("timings") / "a.json", {"format": 1, "times": {'[1, 2, 3, "bf16", false]': 1e-5},
                                                         "flags": {'[3072, 3072, 1, "fp8-dynamic", false]': "too slow"}})
    cache.write_json(cache.folder("timings") / "b.json", "unreadable as a table")
    assert frontier._timing_flags() == {'[3072, 3072, 1, "fp8-dynamic", false]': "too slow"}


def _copy(ts, dur, corr, mib=324):
    return {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": ts, "dur": dur,
            "args": {"correlation": corr, "bytes": mib * 2**20}}


def _issue(ts, corr):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": ts, "dur": 5, "args": {"correlation": corr}}


def test_a_trace_summary_tells_a_late_host_from_a_copy_that_waited_on_its_stream(monkeypatch):
    """copy_trace.summary on a made-up kineto trace: three copies, two gaps. Before the second copy
    the engine idled 2 ms and the host issued that copy 1.5 ms into the gap (late); before the third
    it idled 1 ms though the copy was issued long before (queued behind a wait). A 50 us pause is
    not a gap."""
    monkeypatch.syspath_prepend(str(BENCH))
    import copy_trace

    trace = {"traceEvents": [
        _issue(0, 1), _copy(10, 6000, 1),
        _issue(7510, 2), _copy(8010, 6000, 2),           # gap 6010 -> 8010: 2 ms, issued at 7510 > 6010
        _issue(9000, 3), _copy(15010, 6000, 3, mib=135),  # gap 14010 -> 15010: 1 ms, issued at 9000 < 14010
        _issue(9100, 4), _copy(21060, 100, 4),            # 50 us after: no gap
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 11000, "dur": 3000, "args": {}},
    ]}
    s = copy_trace.summary(trace)
    assert s["copies"] == 4 and abs(s["copy_ms"] - 18.1) < 1e-9
    g = s["gaps"]
    assert (g["count"], g["late"], g["queued"], g["unknown"]) == (2, 1, 1, 0)
    assert abs(g["late_ms"] - 2.0) < 1e-9 and abs(g["queued_ms"] - 1.0) < 1e-9
    assert [x["next_copy"] for x in s["largest_gaps"]] == ["late", "queued"]
    assert s["largest_gaps"][1]["next_copy_mib"] == 135.0
    assert copy_trace.summary({"traceEvents": []})["copies"] == 0


def test_a_traced_run_leaves_a_gzipped_chrome_trace(monkeypatch, tmp_path):
    import gzip

    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    import copy_trace

    trace = copy_trace.record(lambda: torch.randn(64, 64) @ torch.randn(64, 64), tmp_path / "t.json.gz")
    with gzip.open(tmp_path / "t.json.gz", "rt") as f:
        assert json.load(f)["traceEvents"] == trace["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])
    assert copy_trace.summary(trace)["copies"] == 0  # on a CPU: nothing crossed a link


def test_a_gpu_profile_from_before_block_flops_gets_them_from_the_builtins_shapes(monkeypatch):
    """The committed H100 profiles (version 3) have measured seconds but no per-block FLOPs: the
    frontier fills them from the built-in's profile on meta, so its plans share calls by FLOPs."""
    import sys

    from tierquant.profile import Profile

    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("frontier", None)
    import frontier

    old = Profile.load(BENCH / "results/h100/night-2026-11-26/profile-flux-dev.json")
    assert old.components["transformer"].block_flops == []
    new = frontier.with_block_flops(old, "flux-dev")
    t = new.components["transformer"]
    assert len(t.block_flops) == len(t.blocks) == 57 and t.seconds_per_call == old.components["transformer"].seconds_per_call
    assert frontier.with_block_flops(new, "flux-dev") is new


def test_the_even_modifier_gives_the_plans_from_before_the_spread_by_compute(monkeypatch):
    """`tiered+even` is known, and what it does (no spread by compute) leaves the planner listing no
    streamed blocks, its plans spread evenly by count."""
    import sys

    import tierquant
    from tierquant import cost

    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("frontier", None)
    import frontier

    assert frontier._modifiers("tiered+even+staged") == {"even", "staged"}
    with pytest.raises(ValueError, match="even"):
        frontier._modifiers("tiered+evn")
    assert tierquant.plan("flux-dev", budget="8GiB", target="h100").components["transformer"].streamed
    monkeypatch.setattr(cost, "spread_by_compute", lambda *args: [])
    assert tierquant.plan("flux-dev", budget="8GiB", target="h100").components["transformer"].streamed is None


@pytest.mark.parametrize("run", ["2026-12-06-pinned", "2026-12-06-spread", "2026-12-06-night", "2026-12-06-blend"])
def test_the_cost_model_gives_the_h100_runs_steps_from_their_plans(monkeypatch, run):
    """The streamed runs of 2026-12-06 (H100, `results/h100/<run>`), priced from what the rows say
    (each run's residency, its streamed blocks where the plan listed them, prefetch, the unlimited
    run's step, the copies' median rate) with the blocks' compute shared by FLOPs: every median step
    within 5%. Shared by weights, as before profile version 4, the pinned run's Flux 8 GiB step (blocks
    spread evenly) came out more than 8% short. The spread run streamed the blocks the planner listed
    (spread by compute) and, as `tiered+even`, the even spread at 12 and 8 GiB; the night run, plans
    priced with the host-time model (the transformer at 12 GiB streaming 25 of its 57 blocks), and the
    same plans again with the tiles blended in one step (the blend run)."""
    import statistics
    import sys
    from dataclasses import replace

    from tierquant.cost import STREAM_BLOCK_OVERHEAD_S, block_shares, blocks_of, bytes_under, rows_per_param, \
        stream_calls_seconds
    from tierquant.hardware import target
    from tierquant.plan import streamed_blocks
    from tierquant.profile import Profile
    from tierquant.schemes import CATALOG

    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("frontier", None)
    import frontier

    rows = [json.loads(line) for line in (BENCH / f"results/h100/{run}/rows.jsonl").read_text().splitlines()]
    tiered = [r for r in rows if r["strategy"].startswith("tiered")]
    steps = lambda r: statistics.median(s for ph in r["phase_ms"] for s in ph["steps"])  # noqa: E731
    s, hw = CATALOG["fp8-dynamic"], target("h100")
    checked, short = 0, {}
    for name in ("flux-dev", "sd3.5-large"):
        prof = frontier.with_block_flops(
            Profile.load(BENCH / f"results/h100/night-2026-11-26/profile-{name}.json"), name)
        c = prof.components["transformer"]
        step = steps(next(r for r in tiered if r["pipeline"] == name and r["budget_gib"] is None)) / 1e3
        sizes = [bytes_under(p, q, s, rows_per_param(c, s)) for p, q in blocks_of(c)]
        for r in tiered:
            if r["pipeline"] != name or "transformer" not in r["streaming"]:
                continue
            cfg = r["streaming"]["transformer"]
            link = statistics.median(im["transformer"]["gbps_median"] for im in r["copies"]) * 1e9
            moving = set(cfg.get("streamed") or streamed_blocks(len(sizes), cfg["resident_blocks"]))
            assert len(moving) == len(sizes) - cfg["resident_blocks"]
            copies = [b / link if j in moving else 0.0 for j, b in enumerate(sizes)]
            for label, comp in (("flops", c), ("weights", replace(c, block_flops=[]))):
                compute = [step * x for x in block_shares(comp, s, True, hw)]
                priced = (stream_calls_seconds(compute, copies, cfg["prefetch"], max(step - sum(compute), 0.0), 28) / 28
                          + len(moving) * STREAM_BLOCK_OVERHEAD_S)
                error = priced / (steps(r) / 1e3) - 1
                if label == "flops":
                    assert abs(error) < 0.05, (name, r["budget_gib"], error)
                    checked += 1
                else:
                    short[(name, r["budget_gib"])] = error
    assert checked == {"2026-12-06-pinned": 6, "2026-12-06-spread": 8, "2026-12-06-night": 6, "2026-12-06-blend": 3}[run]
    if run == "2026-12-06-pinned":
        assert short[("flux-dev", 8.0)] < -0.08
