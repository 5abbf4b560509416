"""tierquant's command line: profile | plan | apply | run | bench | demo.

Every error a user can cause prints one clear line and exits 2; no tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network at run time, ever
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _console():
    from rich.console import Console

    return Console(stderr=False)


def _pins(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"error: --pin takes COMPONENT=SCHEME, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _load_profile(args):
    from .profile import Profile

    if getattr(args, "profile", None):
        try:
            return Profile.load(args.profile)
        except (OSError, ValueError, KeyError, TypeError) as e:
            from .errors import TierquantError

            raise TierquantError(f"cannot read profile {args.profile}: {e}") from None
    from .pipelines.builtin import names, profile_builtin

    if args.pipeline not in names():
        from .errors import TierquantError

        raise TierquantError(f"unknown pipeline {args.pipeline!r}: built-in pipelines are {', '.join(names())}; "
                             f"or pass --profile FILE made with `tierquant profile`")
    return profile_builtin(args.pipeline)


def cmd_profile(args) -> int:
    from .report import profile_table

    if args.pretrained:
        from diffusers import DiffusionPipeline
        import torch

        from .profiler import profile

        pipe = DiffusionPipeline.from_pretrained(args.pretrained, torch_dtype=torch.bfloat16, local_files_only=True)
        if torch.cuda.is_available():
            pipe.to("cuda")
        size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v}
        prof = profile(pipe, prompt=args.prompt, num_inference_steps=args.steps, **size)
    else:
        prof = _load_profile(args)
    if args.out:
        prof.save(args.out)
    if args.json:
        print(json.dumps(prof.to_dict(), indent=1))
    else:
        _console().print(profile_table(prof))
    return 0


def cmd_plan(args) -> int:
    from .pipelines.builtin import default_call
    from . import plan
    from .report import plan_reasons, plan_table

    prof = _load_profile(args)
    steps = args.steps or (default_call(args.pipeline).get("num_inference_steps") if not args.profile else None)
    p = plan(prof, budget=args.budget, target=args.target, tolerance=args.tolerance, pin=_pins(args.pin),
             steps=steps, measure=False if args.no_measure else None)
    if args.out:
        p.save(args.out)
    if args.json:
        print(p.to_json())
    else:
        con = _console()
        con.print(plan_table(p))
        for para in plan_reasons(p):
            con.print(para, highlight=False)
        for n in p.notes:
            con.print(f"[dim]note: {n}[/dim]")
        if args.out:
            con.print(f"plan written to {args.out}")
    return 0


def cmd_apply(args) -> int:
    from .checkpoint import load, save_applied
    from .plan import Plan

    p = Plan.load(args.plan)
    pipe = load(args.pretrained, p)
    if args.out:
        save_applied(pipe, args.out)
        _console().print(f"applied pipeline saved to {args.out}")
    else:
        _console().print(f"applied {args.plan} to {args.pretrained}; pass --out DIR to save it")
    return 0


def cmd_run(args) -> int:
    from .runner import run

    run(args.plan, args.prompt, pretrained=args.pretrained, pipeline=args.pipeline, steps=args.steps,
        height=args.height, width=args.width, guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt, num_images=args.num_images, seed=args.seed, repeat=args.repeat,
        budget=args.budget, metrics=args.metrics, out=args.out)
    return 0


def cmd_bench(args) -> int:
    # The benchmark lives beside the library, in a source checkout's benchmarks/, not inside it.
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "frontier.py"
    if not script.exists():
        from .errors import TierquantError

        raise TierquantError("tierquant bench runs the frontier benchmark of a source checkout "
                             "(benchmarks/frontier.py), which this installation does not have: clone the "
                             "repository and run python3 benchmarks/frontier.py --help")
    import runpy

    sys.argv = [str(script), *args.rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tierquant", description=(
        "Make multi-component diffusion pipelines fit a GPU and run fast: per-component quantization, "
        "placement and regional compilation, planned from a profile and applied within a memory budget."))
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def source(p):
        p.add_argument("--pipeline", default="flux-dev", help="built-in pipeline name (default flux-dev)")
        p.add_argument("--profile", help="a profile JSON file from `tierquant profile --out`")

    p = sub.add_parser("profile", help="measure what each component of a pipeline costs")
    source(p)
    p.add_argument("--pretrained", help="a local diffusers pipeline folder to profile for real")
    p.add_argument("--prompt", default="a photo of a cat")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--height", type=int, help="image height to profile at (default: the pipeline's)")
    p.add_argument("--width", type=int, help="image width to profile at (default: the pipeline's)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.add_argument("--out", help="write the profile JSON here")
    p.set_defaults(fn=cmd_profile)

    p = sub.add_parser("plan", help="find the fastest per-component plan within a memory budget")
    source(p)
    p.add_argument("--budget", required=True, help="memory budget: 24GiB, 16GB, 12000MiB or bytes")
    p.add_argument("--target", help="plan for this card instead of the running device (e.g. rtx4090)")
    p.add_argument("--tolerance", type=float, help="largest expected relative error per component")
    p.add_argument("--pin", action="append", metavar="COMPONENT=SCHEME", help="fix a component's scheme")
    p.add_argument("--steps", type=int, help="denoising steps to plan for (default: the pipeline's)")
    p.add_argument("--no-measure", action="store_true", help="use the roofline model even on this device")
    p.add_argument("--json", action="store_true", help="print the plan file's JSON on stdout")
    p.add_argument("--out", help="write the plan file here")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("apply", help="load a pipeline folder, apply a plan, save the result")
    p.add_argument("plan")
    p.add_argument("--pretrained", required=True, help="a local diffusers pipeline folder")
    p.add_argument("--out", help="save the applied pipeline here")
    p.set_defaults(fn=cmd_apply)

    p = sub.add_parser("run", help="apply a plan and generate images to files")
    p.add_argument("plan")
    p.add_argument("--prompt", required=True)
    p.add_argument("--pretrained", help="a local diffusers pipeline folder")
    p.add_argument("--pipeline", help="'embedded' for the pipeline shipped with tierquant")
    p.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    p.add_argument("--height", type=int, help="image height, a multiple of 8 (default: the pipeline's)")
    p.add_argument("--width", type=int, help="image width, a multiple of 8 (default: the pipeline's)")
    p.add_argument("--guidance-scale", type=float, help="guidance scale (default: the pipeline's)")
    p.add_argument("--negative-prompt", help="what not to draw, for pipelines that take one")
    p.add_argument("--num-images", type=int, help="images per prompt in each generation (default 1)")
    p.add_argument("--seed", type=int, help="seed of the first generation; the next ones add 1 (default 0)")
    p.add_argument("--repeat", type=int, default=1, help="generations to run, seeds seed, seed+1, ... (default 1)")
    p.add_argument("--budget", help="memory cap on a CUDA GPU: 24GiB, 16GB, ... (default: the plan's budget)")
    p.add_argument("--metrics", metavar="FILE", help="write the run's timings and peak memory here as JSON")
    p.add_argument("--out", default="tierquant-out", help="folder for the images (default tierquant-out)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("bench", help="the frontier benchmark (CUDA): every budget, every strategy")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for benchmarks/frontier.py")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("demo", help="profile, plan, apply and judge the embedded pipeline; write a report")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--quick", action="store_true", help="fewer prompts (for tests)")
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import TierquantError

    try:
        return args.fn(args)
    except TierquantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: a backend is missing: {e}. Install it (pip install torchao bitsandbytes diffusers) "
              f"and try again.", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
