"""tierquant's command line: list | profile | plan | apply | run | compile | bench | demo.

Every error a user can cause prints one clear line and exits 2; no tracebacks.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network at run time, ever
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from .quiet import missing_package, quiet_libraries  # noqa: E402

# Height and width must be multiples of this: the VAEs work on 8x8 pixel patches.
PIXEL_PATCH = 8


def _console():
    from .report import stdout_console

    return stdout_console()


def _error(message: str):
    from .errors import TierquantError

    return TierquantError(message)


def check_numbers(args) -> None:
    """Refuse, in one line, numbers no pipeline or plan can use (only the options the command has)."""
    problems = []
    steps = getattr(args, "steps", None)
    if steps is not None and steps < 1:
        problems.append(f"--steps must be at least 1, got {steps}")
    for flag in ("height", "width"):
        v = getattr(args, flag, None)
        if v is not None and (v <= 0 or v % PIXEL_PATCH):
            problems.append(f"--{flag} must be a positive multiple of {PIXEL_PATCH} (the VAE works on "
                            f"{PIXEL_PATCH}x{PIXEL_PATCH} pixel patches), got {v}")
    batch = getattr(args, "batch", None)
    if batch is not None and batch < 1:
        problems.append(f"--batch must be at least 1, got {batch}")
    tol = getattr(args, "tolerance", None)
    if tol is not None and (not math.isfinite(tol) or tol < 0):
        problems.append(f"--tolerance must be 0 or more (the largest expected error, 1 - cosine of a "
                        f"component's output, that a component may have; e.g. 0.01), got {tol}")
    if problems:
        raise _error("; ".join(problems))


# -- where a profile comes from -----------------------------------------------------------------
def _builtin_name(args) -> str:
    from .pipelines.builtin import names

    name = args.pipeline or "flux-dev"
    if name not in names():
        hint = (" (the embedded pipeline runs with `tierquant run --pipeline embedded` and `tierquant demo`)"
                if name == "embedded" else "")
        raise _error(f"unknown pipeline {name!r}: built-in pipelines are {', '.join(names())}; "
                     f"or pass --profile FILE made with `tierquant profile`{hint}")
    return name


def _size_overrides(args, name: str | None) -> dict:
    """height / width / batch as the built-in pipeline's call arguments; refused for a profile file."""
    given = {f: v for f in ("height", "width", "batch") if (v := getattr(args, f, None)) is not None}
    if given and name is None:
        raise _error(f"{', '.join(f'--{f}' for f in given)} appl{'ies' if len(given) == 1 else 'y'} to built-in "
                     f"pipelines, not to a profile file: a profile is measured at one size. Make one at that size "
                     f"with `tierquant profile --pretrained DIR "
                     f"{' '.join(f'--{f} {v}' for f, v in given.items() if f != 'batch')}`")
    out = {k: v for k, v in given.items() if k != "batch"}
    if "batch" in given:
        import diffusers

        from .pipelines.builtin import spec

        out[_batch_argument(getattr(diffusers, spec(name).pipeline).__call__, name)] = given["batch"]
    return out


def _batch_argument(call, name: str) -> str:
    """The pipeline's call argument for images (or videos) per prompt."""
    from .runner import accepted_arguments

    accepted = accepted_arguments(call)
    for key in ("num_images_per_prompt", "num_videos_per_prompt"):
        if accepted is None or key in accepted:
            return key
    raise _error(f"{name} takes no batch size: leave --batch out")


def _load_profile(args, steps: int | None = None):
    """The profile a command asks for: a file (--profile), or a built-in at the size asked, scaled to
    `steps` (default: the built-in's recommended count)."""
    from .profile import Profile

    if getattr(args, "profile", None):
        if getattr(args, "pipeline", None):
            raise _error("give --pipeline NAME or --profile FILE, not both")
        _size_overrides(args, None)
        try:
            prof = Profile.load(args.profile)
        except FileNotFoundError:
            raise _error(f"no profile file {args.profile}: make one with `tierquant profile ... --out FILE`") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise _error(f"cannot read profile {args.profile}: {e}") from None
        return prof.scaled(steps) if steps else prof
    from .pipelines.builtin import default_call, profile_builtin

    name = _builtin_name(args)
    overrides = _size_overrides(args, name)
    steps = steps or default_call(name).get("num_inference_steps")
    return profile_builtin(name, num_inference_steps=steps, progress=False, **overrides)


def _check_folder(path: str, flag: str = "--pretrained") -> Path:
    p = Path(path)
    if not p.exists():
        raise _error(f"{flag} {path}: no such folder; give a local diffusers pipeline folder (one with "
                     f"model_index.json, as save_pretrained or a Hub download writes it)")
    if not (p / "model_index.json").is_file():
        raise _error(f"{flag} {path} is not a diffusers pipeline folder: it has no model_index.json")
    return p


def _plan_hardware(target: str | None):
    """The Hardware a plan is for: --target, or the running GPU. Never the CPU by accident."""
    from .errors import HardwareError
    from .hardware import TARGETS, HardwareWarning, detect
    from .hardware import target as named

    if target:
        return named(target)
    import torch

    if not torch.cuda.is_available():
        gpus = ", ".join(n for n in TARGETS if n != "cpu")
        raise HardwareError(f"no GPU found: pass --target (one of {gpus}) or --target cpu to plan for this CPU")
    import warnings

    with warnings.catch_warnings():  # tierquant.plan detects it again and warns then
        warnings.simplefilter("ignore", HardwareWarning)
        return detect()


# -- commands ------------------------------------------------------------------------------------
def cmd_list(args) -> int:
    from .hardware import TARGETS, _system_memory
    from .pipelines.builtin import BUILTINS
    from .report import list_tables
    from .schemes import CATALOG

    con = _console()
    for t in list_tables(BUILTINS.values(), TARGETS.values(), CATALOG.values(), _system_memory()):
        con.print(t)
    return 0


def cmd_profile(args) -> int:
    from .report import profile_table

    check_numbers(args)
    if args.pretrained:
        folder = _check_folder(args.pretrained)
        if args.profile or args.pipeline:
            raise _error("give --pretrained DIR, --pipeline NAME or --profile FILE: one source")
        import torch
        from diffusers import DiffusionPipeline

        from .profiler import profile

        try:
            pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise _error(f"cannot load the pipeline in {folder}: {first}") from None
        if torch.cuda.is_available():
            pipe.to("cuda")
        call = {k: v for k, v in (("height", args.height), ("width", args.width)) if v}
        if args.batch:
            call[_batch_argument(type(pipe).__call__, type(pipe).__name__)] = args.batch
        prof = profile(pipe, prompt=args.prompt or "a photo of a cat", num_inference_steps=args.steps or 2, **call)
    else:
        prof = _load_profile(args, steps=args.steps)
    if args.out:
        prof.save(args.out)
    if args.json:
        print(json.dumps(prof.to_dict(), indent=1))
    else:
        _console().print(profile_table(prof))
    return 0


def cmd_plan(args) -> int:
    from . import plan
    from .arguments import parse_pins
    from .cards import plan_budgets
    from .report import plan_reasons, plan_table

    check_numbers(args)
    pins = parse_pins(args.pin)
    if not args.profile:
        _size_overrides(args, _builtin_name(args))  # a bad pipeline name or option, before any work
    budget, target = plan_budgets(args.budget, args.target, _plan_hardware)  # each budget against its card
    prof = _load_profile(args, steps=args.steps)
    p = plan(prof, budget=budget, target=target, tolerance=args.tolerance, pin=pins,
             steps=args.steps or prof.steps, measure=False if args.no_measure else None,
             remeasure=args.remeasure, images=args.images)
    if args.out:
        p.save(args.out)
    if args.json:
        print(p.to_json())
    else:
        con = _console()
        con.print(plan_table(p))
        for para in plan_reasons(p):
            con.print(para, highlight=False, markup=False)
        for n in p.notes:
            con.print(f"note: {n}", style="dim", highlight=False, markup=False)
        if args.out:
            con.print(f"plan written to {args.out}", highlight=False)
    return 0


def cmd_apply(args) -> int:
    from .checkpoint import load, save_applied
    from .plan import Plan

    p = Plan.load(args.plan)
    _check_folder(args.pretrained)
    pipe = load(args.pretrained, p)
    if args.out:
        save_applied(pipe, args.out)
    _console().print(f"applied pipeline saved to {args.out}" if args.out else
                     f"applied {args.plan} to {args.pretrained}; pass --out DIR to save it", highlight=False)
    return 0


def cmd_run(args) -> int:
    from .cards import parse_devices
    from .launch import launch
    from .runner import run

    if args.pretrained:
        _check_folder(args.pretrained)
    devices = parse_devices(args.devices)
    kw = dict(pretrained=args.pretrained, pipeline=args.pipeline, steps=args.steps, height=args.height,
              width=args.width, guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
              num_images=args.num_images, seed=args.seed, repeat=args.repeat, budget=args.budget,
              metrics=args.metrics, out=args.out)
    if devices:  # one process per card where the plan runs context-parallel (launch.py)
        return launch(args.plan, devices, prompt=args.prompt, **kw)
    run(args.plan, args.prompt, **kw)
    return 0


def cmd_compile(args) -> int:
    from .runner import compile_plan

    if args.pretrained:
        _check_folder(args.pretrained)
    compile_plan(args.plan, args.prompt, as_json=args.json, **{k: getattr(args, k) for k in (
        "pretrained", "pipeline", "height", "width", "num_images", "budget", "packages")})
    return 0


def cmd_bench(rest: list[str]) -> int:
    """Everything after `bench` goes to benchmarks/frontier.py (beside the library in a source
    checkout, not inside it), --help included."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "frontier.py"
    if not script.exists():
        raise _error("tierquant bench runs the frontier benchmark of a source checkout "
                     "(benchmarks/frontier.py), which this installation does not have: clone the "
                     "repository and run python3 benchmarks/frontier.py --help")
    import runpy

    saved = sys.argv
    sys.argv = [str(script), *rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        sys.argv = saved
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), quick=args.quick)
    return 0


# -- the parser ----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that says where to look, not a usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .hardware import TARGETS
    from .pipelines.builtin import names

    ap = _Parser(prog="tierquant", description=(
        "Make multi-component diffusion pipelines fit a GPU and run fast: per-component quantization, "
        "placement and regional compilation, planned from a profile and applied within a memory budget."))
    ap.add_argument("--version", action="version", version=f"tierquant {__version__}",
                    help="print tierquant's version and exit")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pipelines, targets = ", ".join(names()), ", ".join(TARGETS)

    def source(p):
        p.add_argument("--pipeline", help=f"built-in pipeline: {pipelines} (default flux-dev; `tierquant list`)")
        p.add_argument("--profile", metavar="FILE", help="a profile JSON file from `tierquant profile --out`")

    def size(p, what):
        p.add_argument("--height", type=int, help=f"image height in pixels, a multiple of 8 (default: the {what}'s)")
        p.add_argument("--width", type=int, help=f"image width in pixels, a multiple of 8 (default: the {what}'s)")
        p.add_argument("--batch", type=int, help="images per prompt in one generation (default 1)")

    p = sub.add_parser("list", help="built-in pipelines, targets and schemes",
                       description="List the built-in pipelines, the target cards and the quantization schemes.")
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("profile", help="measure what each component of a pipeline costs",
                       description="Print (or save) a profile: per component, its weights, calls, work and "
                                   "activation peak. Built-ins need no weights; --pretrained runs a real folder.")
    source(p)
    p.add_argument("--pretrained", metavar="DIR", help="a local diffusers pipeline folder to profile for real")
    p.add_argument("--prompt", help="prompt for the profiled generation (--pretrained; default 'a photo of a cat')")
    p.add_argument("--steps", type=int, help="denoising steps (default: the built-in's recommended count; "
                                             "2 with --pretrained, scaled by the planner)")
    size(p, "pipeline")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.add_argument("--out", metavar="FILE", help="write the profile JSON here")
    p.set_defaults(fn=cmd_profile)

    p = sub.add_parser("plan", help="find the fastest per-component plan within a memory budget",
                       description="Plan each component's scheme, placement and compilation for the fastest "
                                   "generation within --budget, on --target or the running GPU.")
    source(p)
    p.add_argument("--budget", required=True,
                   help="memory budget with its unit: 24GiB (GiB = 1024^3 bytes), 16GB (10^9), 12000MiB; "
                        "one per card for several cards: 12GiB,12GiB")
    p.add_argument("--target", help=f"plan for this card (or one per budget, comma-separated) instead of the "
                                    f"running GPU(s): {targets}")
    p.add_argument("--tolerance", type=float,
                   help="largest expected error per component (1 - cosine of its output), e.g. 0.01")
    p.add_argument("--pin", action="append", metavar="COMPONENT=SCHEME",
                   help="fix a component's scheme, e.g. transformer=fp8-dynamic (repeatable)")
    p.add_argument("--steps", type=int, help="denoising steps to plan for (default: the pipeline's)")
    size(p, "pipeline")
    p.add_argument("--no-measure", action="store_true",
                   help="use the roofline model even on this device (no micro-benchmarks)")
    p.add_argument("--images", type=int, help="images per process: compile only what pays back within them")
    p.add_argument("--remeasure", action="store_true", help="measure this device's layer timings again")
    p.add_argument("--json", action="store_true", help="print the plan file's JSON on stdout")
    p.add_argument("--out", metavar="FILE", help="write the plan file here")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("apply", help="load a pipeline folder, apply a plan, save the result",
                       description="Load a diffusers folder quantizing while loading, apply the plan, save it.")
    p.add_argument("plan", help="a plan file from `tierquant plan --out`")
    p.add_argument("--pretrained", metavar="DIR", required=True, help="a local diffusers pipeline folder")
    p.add_argument("--out", metavar="DIR", help="save the applied pipeline here")
    p.set_defaults(fn=cmd_apply)

    p = sub.add_parser("run", help="apply a plan and generate images to files",
                       description="Apply a plan to a pipeline and generate images; prints each file's path "
                                   "and a last line with what it took.")
    p.add_argument("plan", help="a plan file from `tierquant plan --out`")
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--pretrained", metavar="DIR", help="a local diffusers pipeline folder")
    p.add_argument("--pipeline", help="'embedded' for the pipeline shipped with tierquant")
    p.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    for side in ("height", "width"):
        p.add_argument(f"--{side}", type=int, help=f"image {side}, a multiple of 8 (default: the pipeline's)")
    p.add_argument("--guidance-scale", type=float, help="guidance scale (default: the pipeline's)")
    p.add_argument("--negative-prompt", help="what not to draw, for pipelines that take one")
    p.add_argument("--num-images", type=int, help="images per prompt in each generation (default 1)")
    p.add_argument("--seed", type=int, help="seed of the first generation; the next ones add 1 (default 0)")
    p.add_argument("--repeat", type=int, default=1, help="generations to run, seeds seed, seed+1, ... (default 1)")
    p.add_argument("--budget", help="memory cap on a CUDA GPU: 24GiB, 16GB, ... (default: the plan's budget)")
    p.add_argument("--metrics", metavar="FILE", help="write the run's timings and peak memory here as JSON")
    p.add_argument("--out", metavar="DIR", default="tierquant-out", help="image folder (default tierquant-out)")
    p.add_argument("--devices", help="CUDA GPUs for a plan over several cards, e.g. 0,1,2,3 (one process per card "
                                     "for context parallelism)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("compile", help="compile a plan once for this card, saving torch's artifacts beside it")
    p.add_argument("plan", help="a plan file from `tierquant plan --out`")
    p.add_argument("--pretrained", metavar="DIR", help="a local diffusers pipeline folder")
    p.add_argument("--pipeline", help="'embedded' for the pipeline shipped with tierquant")
    p.add_argument("--prompt", default="a photo of a cat", help="the prompt of the capturing run (default: a cat)")
    for side in ("height", "width"):
        p.add_argument(f"--{side}", type=int, help=f"image {side} you will run at (packages are per size)")
    p.add_argument("--num-images", type=int, help="images per prompt you will run with (packages are per size)")
    p.add_argument("--budget", help="memory cap on a CUDA GPU (default: the plan's budget)")
    p.add_argument("--packages", metavar="KIND", help="also make ahead-of-time packages: graph or aoti (default: "
                   "none; on an H100 they started a process slower than the artifacts: docs/compile.md)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(fn=cmd_compile)

    p = sub.add_parser("bench", help="the frontier benchmark (CUDA; `tierquant bench --help` for its options)",
                       description="Runs benchmarks/frontier.py of a source checkout with the arguments given.")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for benchmarks/frontier.py")
    p.set_defaults(fn=lambda a: cmd_bench(a.rest))

    p = sub.add_parser("demo", help="profile, plan, apply and judge the embedded pipeline; write a report",
                       description="The whole loop on the embedded pipeline, on this machine; writes "
                                   "report.html, images, plan.json and quality.json.")
    p.add_argument("--out", metavar="DIR", default="demo-out", help="folder for the report (default demo-out)")
    p.add_argument("--quick", action="store_true", help="fewer prompts (for tests)")
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .errors import TierquantError

    quiet_libraries()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["bench"]:  # bench's options, --help included, are the benchmark's own
            return cmd_bench(argv[1:])
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help, --version, or a usage error already printed in one line
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        return args.fn(args)
    except (TierquantError, ImportError, OSError, MemoryError) as e:
        print(f"error: {missing_package(e) if isinstance(e, ImportError) else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
