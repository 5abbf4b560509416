"""Where a process's first image goes when the transformer is compiled (issue 11), per start path.

A Flux pipeline with tiny encoders and VAE but a full-width transformer (3072 wide, 24 heads of 128;
`--double`/`--single` blocks, 4096 image tokens and 512 T5 tokens), FP8 blocks compiled. For each path (`jit`: regional
compilation with torch's artifacts; `graph`: exported graph packages; `aoti`: AOTInductor packages),
in its own inductor cache: one process prepares (`compilation.prepare`, as `tierquant compile` does),
then `--processes` fresh ones restore and time their first and second generation, and print what
dynamo and inductor did (graphs compiled, recompilations, FX graph and AOT autograd cache hits,
misses and bypasses).

    python3 benchmarks/first_call.py --out DIR [--paths jit,graph] [--double 3 --single 6]   (GPU)
    python3 benchmarks/first_call.py --out DIR --device cpu --scheme int8-weight --width 256  (to try it)

Its first two GPU runs (H100, 2026-11-26) stopped in the preparing process: cuBLAS refused an FP8
matmul (CUBLAS_STATUS_NOT_SUPPORTED in `torch._scaled_mm`, the text stream's 3072 -> 12288 layer with
32 T5 tokens), first with 64-wide encoders, then with Flux's widths. The call now has Flux's own
shapes: 4096 image tokens (1024 px) and 512 T5 tokens, as at full size, where these layers ran.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def build(args):
    import torch
    from diffusers import FluxTransformer2DModel

    from tierquant.pipelines.tiny import _clip, _t5, tiny_flux

    pipe = tiny_flux(seed=0, dtype=torch.bfloat16)
    heads = args.width // 128 if args.width >= 128 else args.width // 16
    head_dim = args.width // heads
    rope = (head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # Two-layer encoders at Flux's widths (CLIP-L 768, T5-XXL 4096), so that every Linear layer of
        # the transformer has its real shape. With the tiny encoders' 64, cuBLAS refused an FP8 matmul
        # on an H100 (CUBLAS_STATUS_NOT_SUPPORTED, 2026-11-26); those 64-wide inputs are the widths
        # that differed from the full-size runs (fewer tokens did too): a likely cause, not a verified one.
        clip, t5 = _clip(projection=False, hidden=768)[0], _t5(4096)[0]
        pipe.register_modules(text_encoder=clip.to(torch.bfloat16).eval(), text_encoder_2=t5.to(torch.bfloat16).eval())
        pipe.transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=pipe.transformer.config.in_channels, num_layers=args.double,
            num_single_layers=args.single, attention_head_dim=head_dim, num_attention_heads=heads,
            joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=rope,
        ).to(torch.bfloat16)
    return pipe.to(args.device)


def child(args) -> dict:
    import torch

    import tierquant
    from tierquant import compilation
    from tierquant.plan import Plan
    from tierquant.pipelines.tiny import tiny_flux_call

    sys.path.insert(0, str(HERE.parents[1] / "tests"))
    from test_apply import plan_for

    # Flux's own T5 length, so the text stream's matmuls have their full-size shapes too
    call = tiny_flux_call(seed=1, height=args.size, width=args.size, max_sequence_length=args.text_tokens)
    pipe = build(args)
    plan_path = Path(args.work) / "plan.json"
    if args.stage == "prepare":
        plan = plan_for(pipe, {"transformer": (args.scheme, "resident", True)})
        plan.save(plan_path)
    else:
        plan = Plan.load(plan_path)
    tierquant.apply(pipe, plan, progress=False)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    out = {"path": args.path, "stage": args.stage}
    prof = None
    if args.profile:  # where the compile's seconds go, by function (cProfile slows it; shares hold)
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t = time.perf_counter()
    if args.stage == "prepare":
        r = compilation.prepare(pipe, plan, call, plan_path=plan_path, quiet=True,
                                packages=None if args.path == "jit" else args.path)
        out["prepare_s"] = time.perf_counter() - t
    else:
        r = compilation.restore(pipe, plan, plan_path=plan_path, quiet=True, aot=args.path != "jit")
        out["restore_s"] = time.perf_counter() - t
        for i in ("first", "second"):
            t = time.perf_counter()
            pipe(**call)
            sync()
            out[f"{i}_s"] = time.perf_counter() - t
    if prof is not None:
        import io
        import pstats

        prof.disable()
        for order in ("cumulative", "tottime"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(order).print_stats(45)
            (Path(args.work) / f"{args.stage}-{os.getpid()}-{order}.txt").write_text(buf.getvalue())
    out["compile"] = compilation.compile_stats()
    out["report"] = r.to_dict()
    out["usage"] = compilation.usage(pipe.transformer)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--paths", default="jit,graph")
    ap.add_argument("--processes", type=int, default=2, help="fresh processes after the preparing one")
    ap.add_argument("--double", type=int, default=3)
    ap.add_argument("--single", type=int, default=6)
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--size", type=int, default=1024, help="image side: (size/16)^2 image tokens, 1024 -> 4096")
    ap.add_argument("--text-tokens", type=int, default=512, help="T5 tokens (Flux's max_sequence_length)")
    ap.add_argument("--scheme", default="fp8-dynamic")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--profile", action="store_true", help="cProfile each process: <work>/<stage>-<pid>-*.txt")
    ap.add_argument("--child", nargs=3, metavar=("PATH", "STAGE", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.path, args.stage, args.work = args.child
        print("RESULT" + json.dumps(child(args)), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in args.paths.split(","):
        work = out / path
        work.mkdir(exist_ok=True)
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"),
               "TIERQUANT_CACHE": str(work / "tq-cache"), "PYTHONFAULTHANDLER": "1"}
        for i, stage in enumerate(["prepare"] + ["restore"] * args.processes):
            cmd = [sys.executable, str(HERE), "--out", str(out), "--double", str(args.double), "--single",
                   str(args.single), "--width", str(args.width), "--size", str(args.size), "--scheme", args.scheme,
                   "--text-tokens", str(args.text_tokens),
                   "--device", args.device, "--child", path, stage, str(work)] + (["--profile"] if args.profile else [])
            t = time.perf_counter()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
                rc, so, se = p.returncode, p.stdout, p.stderr
            except subprocess.TimeoutExpired as e:
                rc, so, se = "timeout", e.stdout or "", e.stderr or ""
                so, se = (x.decode() if isinstance(x, bytes) else x for x in (so, se))
            (work / f"{i}-{stage}.log").write_text(so + "\n--- stderr ---\n" + se)
            line = next((l for l in so.splitlines() if l.startswith("RESULT")), None)
            row = json.loads(line[6:]) if line else {"path": path, "stage": stage, "error": f"exit {rc}: {se[-600:]}"}
            row.update(process=i, wall_s=round(time.perf_counter() - t, 1))
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("path", "process", "stage", "prepare_s", "restore_s",
                                                      "first_s", "second_s", "wall_s", "error")}), flush=True)
            (out / "first-call.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
            if not line:
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
