#!/usr/bin/env python3
"""The multi-GPU benchmark (CUDA, 2 or more cards of one machine, no network): flux-dev at each size,
planned for one card and for the N cards given, each plan run in fresh processes (one per card for
context parallelism, as `tierquant run --devices` starts them).

On a machine with N GPUs (wheels carried in .whl, as benchmarks/gpu.sh installs them):
    python3 benchmarks/multi_gpu.py --devices 0,1 --sizes 256,1024 --out $OUT
Then, here, the committed table and plot from the rows that came back:
    python3 benchmarks/multi_gpu.py --report $OUT/rows.jsonl --out benchmarks/results/h200x2

Strategies (--strategies), each at each --sizes:
  one-card      tierquant.plan with one budget, on the first device
  tiered        tierquant.plan with a budget per device (components across cards, or context parallelism)
  cards         components across cards only (devices.plan_devices(..., parallel=False))
  ulysses:K, ring:K   that context parallelism over the first K devices, whatever the planner would pick
A row records the plan's predicted seconds beside the measured ones: what the collective latency and
ring-step constants of `tierquant/parallel.py` should be checked against. Budgets: --budget GiB per
card (default: the whole card).
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
PIPELINE = "flux-dev"


def strategies(n: int) -> list[str]:
    out = ["one-card", "tiered", "cards"]
    for k in (2, 4, 8):
        if k <= n:
            out += [f"ulysses:{k}", f"ring:{k}"]
    return out


def make_plan(strategy: str, size: int, steps: int | None, budget_gib: float | None, devices: list[int]):
    """The plan a strategy runs (planning only: no weights, pure but for detecting the cards)."""
    import tierquant
    from tierquant.devices import plan_devices
    from tierquant.hardware import detect_cards
    from tierquant.pipelines.builtin import default_call, profile_builtin

    cards = [detect_cards()[d] for d in devices]
    budgets = [int(budget_gib * GiB) if budget_gib else c.memory_bytes for c in cards]
    steps = steps or default_call(PIPELINE)["num_inference_steps"]
    prof = profile_builtin(PIPELINE, height=size, width=size, num_inference_steps=steps, progress=False)
    if strategy == "one-card":
        return tierquant.plan(prof, budget=budgets[0], target=cards[0], steps=steps)
    if strategy == "tiered":
        return tierquant.plan(prof, budget=budgets, target=cards, steps=steps)
    if strategy == "cards":
        return plan_devices(prof, cards, budgets, parallel=False)
    kind, k = strategy.split(":")
    return plan_devices(prof, cards, budgets, parallel=(kind, int(k)))


def run_one(spec: dict) -> dict | None:
    """One process of a run: build flux-dev at full size (random weights, the same on every rank),
    apply the plan, one warm-up image, then timed ones. Rank 0 (or the only process) returns the row."""
    import torch

    import tierquant
    from tierquant.pipelines.builtin import build, default_call
    from tierquant.plan import Plan

    rank = int(os.environ.get("RANK", "0"))
    dist = None
    if "RANK" in os.environ:
        import torch.distributed as dist

        card = torch.device("cuda", int(os.environ["TIERQUANT_CARD"]))
        torch.cuda.set_device(card)
        dist.init_process_group("nccl", device_id=card)
    plan = Plan.load(spec["plan_path"])
    kw = {**default_call(PIPELINE), "height": spec["size"], "width": spec["size"], "output_type": "pil"}
    if spec.get("steps"):
        kw["num_inference_steps"] = spec["steps"]
    row = {"pipeline": PIPELINE, "budget_gib": spec.get("budget_gib"), "strategy": spec["label"],
           "card": torch.cuda.get_device_name(), "devices": len(spec["devices"]), "size": spec["size"],
           "oom": False, "seconds_per_image": None, "peak_reserved_bytes": None, "setup_s": None,
           "first_image_s": None, "predicted_latency_s": plan.predicted_latency_s, "parallel": plan.parallel,
           "plan": {n: f"{c.scheme}/{c.placement}{'+compile' if c.compile else ''}@{c.device}"
                    for n, c in plan.components.items()},
           "date": time.strftime("%Y-%m-%d"), "versions": {m: getattr(__import__(m), "__version__", None)
                                                           for m in ("torch", "diffusers", "torchao")}}

    def sync():
        for d in range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)
        if dist is not None:
            dist.barrier()

    try:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        pipe = tierquant.apply(build(PIPELINE, device="cpu", dtype=torch.bfloat16), plan, progress=False)
        pipe.set_progress_bar_config(disable=True)
        sync()
        row["setup_s"] = time.perf_counter() - t0
        gen = lambda seed: pipe(**kw, generator=torch.Generator("cpu").manual_seed(seed))  # noqa: E731
        t1 = time.perf_counter()
        gen(0)
        sync()
        row["first_image_s"] = time.perf_counter() - t1
        times = []
        for seed in range(1, 1 + spec.get("images", 3)):
            t = time.perf_counter()
            gen(seed)
            sync()
            times.append(time.perf_counter() - t)
        row["seconds_per_image"], row["times"] = statistics.median(times), times
    except torch.OutOfMemoryError as e:
        row["oom"], row["error"] = True, str(e).splitlines()[0][:300]
    except Exception as e:  # noqa: BLE001 - a benchmark row records what went wrong
        row["error"], row["traceback"] = f"{type(e).__name__}: {str(e)[:500]}", traceback.format_exc()[-3000:]
    row["peak_reserved_bytes"] = max(torch.cuda.max_memory_reserved(d) for d in range(torch.cuda.device_count()))
    if dist is not None:
        dist.destroy_process_group()
    return row if rank == 0 else None


def spawn(spec: dict, plan, out: Path, timeout: int) -> dict:
    """Start the run's processes (launch.commands: one, or one per card) and collect rank 0's row."""
    from tierquant.launch import commands, free_port

    argv = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    procs = []
    for env, _ in commands(plan, spec["devices"], {}, free_port()):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}  # the plan's card i is devices[i]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs, row = [], None
    try:
        for p in procs:
            text, _ = p.communicate(timeout=timeout)
            logs.append(text)
    except subprocess.TimeoutExpired:
        row = {**spec, "error": f"timed out after {timeout} s", "oom": False}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / f"{spec['label'].replace(':', '_').replace(' ', '_')}.log").write_text("\n=====\n".join(logs))
    for line in reversed((logs or [""])[0].splitlines()):
        if line.startswith("ROW "):
            return json.loads(line[4:])
    return row or {**spec, "error": f"no row (exit codes {[p.returncode for p in procs]})", "oom": False}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--devices", default="0,1", help="CUDA devices, comma-separated (default 0,1)")
    ap.add_argument("--sizes", default="256,1024", help="image sizes (square), comma-separated")
    ap.add_argument("--strategies", help="comma-separated (default: one-card, tiered, cards, ulysses:K, ring:K)")
    ap.add_argument("--budget", type=float, help="GiB per card (default: the whole card)")
    ap.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's, 28)")
    ap.add_argument("--images", type=int, default=3, help="timed images per run (after one warm-up)")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per run")
    ap.add_argument("--out", default=os.environ.get("OUT", "multi-gpu-out"), help="folder for rows.jsonl and logs")
    ap.add_argument("--report", nargs="*", help="rows.jsonl files to turn into frontier.json, .md and .png")
    args = ap.parse_args(argv)
    if args.one:
        row = run_one(json.loads(args.one))
        if row is not None:
            print("ROW " + json.dumps(row), flush=True)
        return 0
    if args.report is not None:
        from frontier_report import write_report

        write_report([Path(p) for p in args.report], Path(args.out))
        return 0
    from tierquant.cards import parse_devices
    from tierquant.errors import TierquantError

    try:
        devices = parse_devices(args.devices)
        sizes = [int(s) for s in args.sizes.split(",")]
    except (TierquantError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(devices) < 2 or any(s <= 0 or s % 16 for s in sizes):
        print("error: give at least two --devices, and --sizes that are positive multiples of 16", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() <= max(devices):
        print(f"error: --devices {args.devices} needs that many CUDA GPUs; torch sees "
              f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}", file=sys.stderr)
        return 2
    out = Path(args.out)
    (out / "plans").mkdir(parents=True, exist_ok=True)
    for size in sizes:
        for strategy in (args.strategies.split(",") if args.strategies else strategies(len(devices))):
            label = f"{strategy} {size}px"
            try:
                plan = make_plan(strategy, size, args.steps, args.budget, devices)
            except TierquantError as e:
                row = {"pipeline": PIPELINE, "budget_gib": args.budget, "strategy": label, "skipped": str(e),
                       "oom": False, "card": torch.cuda.get_device_name(devices[0]), "size": size}
            else:
                path = plan.save(out / "plans" / f"{strategy.replace(':', '_')}-{size}.json")
                spec = {"plan_path": str(path), "label": label, "size": size, "steps": args.steps,
                        "budget_gib": args.budget, "images": args.images, "devices": devices}
                row = spawn(spec, plan, out, args.timeout)
            with (out / "rows.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            sp, pr = row.get("seconds_per_image"), row.get("predicted_latency_s")
            print(f"{label:22} {f'{sp:.2f} s/img' if sp else row.get('skipped') or (row.get('error') or '')[:60]}"
                  f"  pred {pr or 0:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
