"""The real user's path, recorded (issue 9, item 4): a full-size checkpoint on local disk, a plan made by
`tierquant plan` in a fresh process, then `tierquant run` in a fresh process twice (the second finds the
first's compile caches: `<plan>.compile-cache.bin` and inductor's cache in /tmp), with the run's host memory
sampled from outside (RssAnon every 0.2 s: safetensors' mmap shows up as file pages, not as anon).

    OUT=out python3 benchmarks/user_path.py --pipelines flux-dev --budgets 24,12 --deadline 300
    python3 benchmarks/user_path.py --report out/user-path.json          (a Markdown table)
    python3 benchmarks/user_path.py --dry-run --out /tmp/up              (CPU, tiny Flux: tests the machinery)

Rows go to $OUT/user-path.json, rewritten after every process, so a call cut short keeps what finished.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

GiB = 1024**3
PROMPT = "a photo of a cat"
PROCESSES = ("first", "second")
KEYS = ("pipeline", "budget_gib", "process", "load_s", "apply_s", "first_image_s", "seconds_per_image",
        "peak_reserved_bytes", "host_peak_rss_bytes", "host_peak_anon_bytes", "card", "date")
HERE = Path(__file__).resolve()
CLI = [sys.executable, "-m", "tierquant.cli"]  # no console script on the lent machine


# -- pure parts (tested on the CPU) -------------------------------------------------------------

def plan_facts(plan: dict | None) -> dict:
    """What a row needs from the plan JSON: its host memory (if the plan states it), the largest
    component in bf16, and a one-line-per-component summary."""
    if not plan:
        return {}
    comps = plan.get("pipeline", {}).get("components", {})
    out = {"largest_component_bf16_bytes": max((int(c.get("params", 0)) * 2 for c in comps.values()), default=None),
           "plan": {n: f"{c['scheme']}/{c['placement']}{'+compile' if c.get('compile') else ''}"
                    for n, c in plan.get("components", {}).items()},
           "predicted_latency_s": plan.get("predicted_latency_s"),
           "predicted_peak_bytes": plan.get("predicted_peak_bytes")}
    if plan.get("host_bytes") is not None:
        out["plan_host_bytes"] = int(plan["host_bytes"])
    return out


def make_row(pipeline: str, budget_gib, process: str, metrics: dict | None, peaks: dict, plan: dict | None = None,
             card: str | None = None, **extra) -> dict:
    """One row: the run's own metrics (M.json) + the host peaks sampled from outside + plan facts.
    peaks: {"anon": max RssAnon, "hwm": max VmHWM, "tree_anon": max RssAnon summed over the process tree}."""
    m = metrics or {}
    row = {"pipeline": pipeline, "budget_gib": budget_gib, "process": process,
           **{k: m.get(k) for k in ("load_s", "apply_s", "first_image_s", "seconds_per_image", "peak_reserved_bytes")},
           # VmHWM as the run saw it at exit; our own sampling can miss a peak between two samples.
           "host_peak_rss_bytes": m.get("host_peak_rss_bytes") or peaks.get("hwm") or None,
           "host_peak_anon_bytes": peaks.get("anon") or None,
           "card": m.get("card") or card, "date": m.get("date") or time.strftime("%Y-%m-%d")}
    row["host_tree_peak_anon_bytes"] = peaks.get("tree_anon") or None  # + inductor's compile workers
    for k in ("generation_s", "images", "budget_bytes", "compile"):
        if k in m:
            row[k] = m[k]
    row.update(plan_facts(plan))
    anon, big, host = row["host_peak_anon_bytes"], row.get("largest_component_bf16_bytes"), row.get("plan_host_bytes")
    if anon and big and host is not None:
        # A run may hold one component in bf16 while it quantizes it, plus what the plan keeps on the host.
        row["host_limit_bytes"] = big + host + 2 * GiB
        row["host_check_ok"] = anon < row["host_limit_bytes"]
    row.update(extra)
    return row


def ok(row: dict | None) -> bool:
    """A run that finished: timed images and no error (an OOM or a timeout is tried again)."""
    return bool(row) and row.get("seconds_per_image") is not None and not row.get("error") and not row.get("oom")


def todo(rows: list[dict], pipeline: str, budget_gib, plan_here: bool, compiled: bool = False) -> list[str]:
    """Which processes to run for (pipeline, budget) given earlier rows (those after `tierquant compile`
    when `compiled`, else the others). A lone "second" is only meaningful where the first's caches
    are: on this machine, i.e. where its plan file still is."""
    done = {r["process"] for r in rows if r["pipeline"] == pipeline and r["budget_gib"] == budget_gib and ok(r)
            and bool(r.get("compile_mode")) == compiled}
    if {"first", "second"} <= done:
        return []
    if "first" in done and plan_here:
        return ["second"]
    return ["first", "second"]


def put(rows: list[dict], row: dict) -> None:
    """Replace the row with the same (pipeline, budget, process, compile mode), else append: a run
    after `tierquant compile` (`--compile`) sits beside the one without."""
    def key(r):
        return r["pipeline"], r["budget_gib"], r["process"], r.get("compile_mode")

    for i, r in enumerate(rows):
        if key(r) == key(row):
            rows[i] = row
            return
    rows.append(row)


def _gib(b) -> str:
    return f"{b / GiB:.1f}" if b else "-"


def _s(x) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) else "-"


def report(rows: list[dict]) -> str:
    """The rows as a Markdown table (benchmarks/results/<card>/user-path.md)."""
    head = ["pipeline", "budget GiB", "process", "tierquant compile", "load s", "first image s", "s/image",
            "peak reserved GiB", "host peak RSS GiB", "host anon GiB", "host check", "engine"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sp = r.get("seconds_per_image")
        spi = f"{sp:.2f}" if sp is not None and not r.get("error") else \
            "OOM" if r.get("oom") else (r.get("error") or "-")[:60].replace("|", "/")
        check = "-" if "host_check_ok" not in r else \
            ("ok" if r["host_check_ok"] else "over") + f" (< {_gib(r.get('host_limit_bytes'))})"
        before = (r.get("compile_mode") or "-") + (f", {_s(r['compile_s'])} s" if r.get("compile_s") else "")
        lines.append("| " + " | ".join([r["pipeline"], str(r["budget_gib"]), r["process"], before, _s(r.get("load_s")),
                                          _s(r.get("first_image_s")), spi, _gib(r.get("peak_reserved_bytes")),
                                          _gib(r.get("host_peak_rss_bytes")), _gib(r.get("host_peak_anon_bytes")),
                                          check, (r.get("engine") or "-").split(" ")[0]]) + " |")
    cards = sorted({r["card"] for r in rows if r.get("card")})
    return "\n".join(lines) + (f"\n\nCard: {', '.join(cards)}.\n" if cards else "\n")


# -- processes ----------------------------------------------------------------------------------

def _status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "VmHWM"):
                    out[k] = int(v.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass  # gone between two looks
    return out


def _descendants(pid: int) -> list[int]:
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return kids + [d for k in kids for d in _descendants(k)]


def run_process(cmd: list[str], log: Path, timeout: float, env: dict) -> dict:
    """Run cmd in its own process group, output to `log`, sampling its host memory every 0.2 s."""
    peaks = {"anon": 0, "hwm": 0, "tree_anon": 0}
    t0 = time.perf_counter()
    timed_out = False
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while p.poll() is None:
                if time.perf_counter() - t0 > timeout:
                    timed_out = True
                    break
                s = _status(p.pid)
                peaks["anon"] = max(peaks["anon"], s.get("RssAnon", 0))
                peaks["hwm"] = max(peaks["hwm"], s.get("VmHWM", 0))
                peaks["tree_anon"] = max(peaks["tree_anon"], s.get("RssAnon", 0) + sum(
                    _status(c).get("RssAnon", 0) for c in _descendants(p.pid)))
                time.sleep(0.2)
        finally:
            # Our child's group only: it, and compile workers it left behind.
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
    text = log.read_text(errors="replace")
    tail = [l for l in text.splitlines() if l.strip()]
    return {"rc": p.returncode, "wall_s": time.perf_counter() - t0, "timed_out": timed_out, "peaks": peaks,
            "oom": p.returncode != 0 and ("OutOfMemoryError" in text or "out of memory" in text.lower()),
            "last_line": tail[-1][:300] if tail else ""}


def _evict(folder: Path) -> None:
    """Drop the checkpoint's pages from the page cache (no root needed: only our files), so the first
    run reads from disk as after a download the user did yesterday, not from the RAM we just wrote it from."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            finally:
                os.close(fd)


# -- children (run as `user_path.py --save ...` / `--dry-plan ...` in a fresh process) -------------

def save_child(name: str, ckpt: str, dry: bool) -> None:
    import torch

    t0 = time.perf_counter()
    if dry:
        from tierquant.pipelines.tiny import tiny_flux

        pipe = tiny_flux(dtype=torch.bfloat16)
    else:
        from tierquant.pipelines.builtin import build

        pipe = build(name, device="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
    t1 = time.perf_counter()
    pipe.save_pretrained(ckpt, safe_serialization=True)
    print("SAVED " + json.dumps({"build_s": t1 - t0, "save_s": time.perf_counter() - t1}), flush=True)


def dry_plan_child(budget_gib: str, out: str, compile: bool = False) -> None:
    """`tierquant plan` cannot plan the tiny pipeline by name: plan it in Python (CPU, roofline). With
    `compile`, the transformer is compiled (a CPU plan never is), so that `--compile` has work to do."""
    import torch

    import tierquant
    from tierquant.pipelines.tiny import tiny_flux, tiny_flux_call

    plan = tierquant.plan(tiny_flux(dtype=torch.bfloat16), budget=f"{budget_gib}GiB", measure=False,
                          **tiny_flux_call())
    if compile:
        plan.components["transformer"].compile = True
    plan.save(out)


# -- the driver ---------------------------------------------------------------------------------

def _card(dry: bool) -> str | None:
    if dry:
        return "cpu (dry run)"
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return None


def _run_cmd(plan: Path, ckpt: Path, metrics: Path, images: Path, dry: bool) -> list[str]:
    cmd = CLI + ["run", str(plan), "--pretrained", str(ckpt), "--prompt", PROMPT, "--repeat", "4",
                 "--metrics", str(metrics), "--out", str(images)]
    return cmd + (["--steps", "2", "--height", "64", "--width", "64"] if dry else [])


def _compile(plan: Path, ckpt: Path, log: Path, args, env) -> dict:
    """`tierquant compile PLAN` in a fresh process: its wall time and the mode the report gives (what a
    later `run` starts from: aot, artifacts or jit)."""
    cmd = CLI + ["compile", str(plan), "--pretrained", str(ckpt), "--prompt", PROMPT, "--json"]
    cmd += ["--packages", args.packages] if args.packages else []
    if args.dry_run:
        cmd += ["--height", "64", "--width", "64"]
    r = run_process(cmd, log, args.timeout, env)
    text = log.read_text()
    starts = [m.start() for m in re.finditer(r"^\{$", text, re.M)]  # the report: the last JSON object printed
    try:
        mode = json.loads(text[starts[-1]:text.rfind("}") + 1])["mode"] if starts else None
    except (ValueError, KeyError):
        mode = None
    out = {"compile_s": round(r["wall_s"], 1), "compile_mode": mode}
    if r["rc"] != 0:
        out["compile_error"] = f"exit {r['rc']}: {r['last_line']}"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipelines", default="flux-dev,sd3.5-large")
    ap.add_argument("--budgets", default="24,16,12", help="GiB, comma-separated")
    ap.add_argument("--workdir", default="/tmp/tq-user-path", help="checkpoints, plans, images, logs")
    ap.add_argument("--out", default=os.environ.get("OUT", "user-path-out"))
    ap.add_argument("--timeout", type=float, default=900, help="seconds per process")
    ap.add_argument("--compile", action="store_true",
                    help="run `tierquant compile` after planning, before the first process (issue 11's path)")
    ap.add_argument("--packages", metavar="KIND", help="with --compile: `tierquant compile --packages KIND`")
    ap.add_argument("--deadline", type=float, default=0, help="start no process after this many seconds")
    ap.add_argument("--skip-existing", nargs="?", const="", metavar="FILE",
                    help="skip rows already done in FILE (default: --out's user-path.json)")
    ap.add_argument("--dry-run", action="store_true", help="tiny Flux on the CPU: exercise the machinery")
    ap.add_argument("--report", metavar="JSON", help="print a user-path.json as a Markdown table")
    ap.add_argument("--save", nargs=2, metavar=("NAME", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--dry-plan", nargs=2, metavar=("BUDGET", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.report:
        print(report(json.loads(Path(args.report).read_text())["rows"]), end="")
        return 0
    if args.save:
        save_child(*args.save, dry=args.dry_run)
        return 0
    if args.dry_plan:
        dry_plan_child(*args.dry_plan, compile=args.compile)
        return 0

    # The parent imports no torch: it must hold no GPU memory and no host memory of its own.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a hard limit still kills our child (finally)
    start = time.perf_counter()
    out, work = Path(args.out), Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    rows_path = out / "user-path.json"
    prev = Path(args.skip_existing or rows_path) if args.skip_existing is not None else None
    rows = json.loads(prev.read_text())["rows"] if prev and prev.exists() else []
    card = _card(args.dry_run)
    src = str(HERE.parents[1] / "src")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), src) if p)}

    def save_rows():
        tmp = rows_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
        tmp.replace(rows_path)

    def late(what: str) -> bool:
        if args.deadline and time.perf_counter() - start > args.deadline:
            print(f"deadline reached: not starting {what}", flush=True)
            return True
        return False

    save_rows()  # the earlier rows are there even if this call is cut short before its first run ends
    for name in args.pipelines.split(","):
        pdir, budgets = work / name, [float(b) if "." in b else int(b) for b in args.budgets.split(",")]
        ckpt, plan_path = pdir / "ckpt", lambda b: pdir / f"plan-{b}.json"  # noqa: E731
        work_left = {b: todo(rows, name, b, plan_path(b).exists(), args.compile) for b in budgets}
        if not any(work_left.values()):
            print(f"{name}: all rows done", flush=True)
            continue
        if late(name):
            continue
        if not (pdir / "ckpt.done").exists():
            for other in work.iterdir():  # 64 GiB of disk: one full checkpoint at a time
                if other.is_dir() and other.name != "logs":
                    shutil.rmtree(other / "ckpt", ignore_errors=True)
                    (other / "ckpt.done").unlink(missing_ok=True)
            pdir.mkdir(parents=True, exist_ok=True)
            log = work / "logs" / f"{name}-save.log"
            r = run_process([sys.executable, str(HERE), "--save", name, str(ckpt)] + ["--dry-run"] * args.dry_run,
                            log, args.timeout, env)
            got = [l for l in log.read_text().splitlines() if l.startswith("SAVED ")]
            if r["rc"] != 0 or not got:
                print(f"{name}: saving the checkpoint failed: {r['last_line']}", flush=True)
                b = next(b for b in budgets if work_left[b])
                put(rows, make_row(name, b, "first", None, {}, card=card, error=f"save: {r['last_line']}"))
                save_rows()
                continue
            (pdir / "ckpt.done").write_text(got[0][6:])
            saved = json.loads(got[0][6:])
            print(f"{name}: built in {saved['build_s']:.0f} s, saved in {saved['save_s']:.0f} s, "
                  f"{sum(f.stat().st_size for f in ckpt.rglob('*') if f.is_file()) / GiB:.1f} GiB", flush=True)
        saved = json.loads((pdir / "ckpt.done").read_text())
        for b in budgets:
            # inductor's cache of its own per (pipeline, budget), emptied before the first process: that
            # one starts cold even where earlier jobs on the machine compiled the same blocks
            inductor = pdir / f"inductor-{b}"
            env_b = {**env, "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
            extra_first = {"compile_mode": next((r["compile_mode"] for r in rows if r.get("compile_mode") and
                                                 (r["pipeline"], r["budget_gib"]) == (name, b)), None)}
            for process in work_left[b]:
                if late(f"{name} {b} {process}"):
                    break
                plan = plan_path(b)
                if process == "first":
                    plan.unlink(missing_ok=True)
                    plan.with_suffix(".compile-cache.bin").unlink(missing_ok=True)  # a cold first run
                    shutil.rmtree(inductor, ignore_errors=True)
                    cmd = [sys.executable, str(HERE), "--dry-plan", str(b), str(plan)] + ["--compile"] * args.compile \
                        if args.dry_run else \
                        CLI + ["plan", "--pipeline", name, "--budget", f"{b}GiB", "--json", "--out", str(plan)]
                    r = run_process(cmd, work / "logs" / f"{name}-{b}-plan.log", args.timeout, env_b)
                    if r["rc"] != 0 or not plan.exists():
                        print(f"{name} {b}: planning failed: {r['last_line']}", flush=True)
                        put(rows, make_row(name, b, "first", None, {}, card=card, error=f"plan: {r['last_line']}"))
                        save_rows()
                        break
                    shutil.copy(plan, work / "logs" / f"{name}-plan-{b}.json")
                    if args.compile:
                        extra_first = _compile(plan, ckpt, work / "logs" / f"{name}-{b}-compile.log", args, env_b)
                        print(f"{name} {b} compile: {extra_first}", flush=True)
                    _evict(ckpt)
                plan_json = json.loads(plan.read_text())
                rdir = pdir / f"run-{b}-{process}"
                shutil.rmtree(rdir, ignore_errors=True)
                rdir.mkdir(parents=True)
                metrics, log = rdir / "metrics.json", work / "logs" / f"{name}-{b}-{process}.log"
                cmd = _run_cmd(plan, ckpt, metrics, rdir / "images", args.dry_run)
                r, extra = run_process(cmd, log, args.timeout, env_b), {}
                if args.compile:  # both processes start from what `tierquant compile` made
                    extra.update(extra_first if process == "first" else {"compile_mode": extra_first.get("compile_mode")})
                if args.dry_run and r["rc"] == 2 and "unrecognized arguments" in log.read_text():
                    # This tierquant run predates --repeat/--metrics/--height/--width: one plain image.
                    r = run_process(cmd[:cmd.index("--repeat")] + cmd[cmd.index("--out"):cmd.index("--height")],
                                    log, args.timeout, env_b)
                    extra["note"] = "dry run: tierquant run without --repeat/--metrics"
                m = json.loads(metrics.read_text()) if metrics.exists() else None
                if r["timed_out"]:
                    extra["error"] = f"timed out after {args.timeout:.0f} s"
                elif r["rc"] != 0:
                    extra["error"] = f"exit {r['rc']}: {r['last_line']}"
                elif m is None and "note" not in extra:
                    extra["error"] = "no metrics file"
                error = extra.get("error")
                row = make_row(name, b, process, m, r["peaks"], plan_json, card=card, wall_s=round(r["wall_s"], 1),
                               oom=r["oom"], save_s=saved.get("save_s"), page_cache_evicted=process == "first",
                               **extra)
                put(rows, row)
                save_rows()
                anon = f"host anon {(row['host_peak_anon_bytes'] or 0) / GiB:.1f} GiB"
                sp = row["seconds_per_image"]
                what = ("OOM" if r["oom"] else error) if error or r["oom"] else \
                    f"first image {_s(row['first_image_s'])} s, {f'{sp:.2f}' if sp else '-'} s/img, " \
                    f"peak {(row['peak_reserved_bytes'] or 0) / GiB:.1f} GiB"
                print(f"{name} {b} {process}: {what}, {anon}, wall {r['wall_s']:.0f} s", flush=True)
                if process == "first" and (error or r["oom"]):
                    break  # the first left no caches: a second would be another first
    save_rows()
    return 0


if __name__ == "__main__":
    sys.exit(main())
