"""Generating images from a plan: the user path (`tierquant run`).

Load a pipeline (a diffusers folder, or the embedded one), apply a plan, generate, write PNGs that
never overwrite, print each path and a last line with what it took, and optionally a metrics JSON.

Everything a user can get wrong (numbers, options the pipeline does not take, a plan made for
another kind of device) is refused with one TierquantError line before any weights are read.
"""
from __future__ import annotations

import datetime
import inspect
import json
import math
import re
import statistics
import sys
import time
import unicodedata
from pathlib import Path

from . import compilation
from .multiapply import apply_plan as apply, load_plan as load
from .errors import DeviceMismatchError, HardwareError, TierquantError, UnsupportedOptionError
from .hardware import detect, gib, parse_budget
from .plan import Plan

# (flag, pipeline __call__ argument) for each option passed only when the user gives it.
OPTIONS = {
    "--steps": "num_inference_steps",
    "--height": "height",
    "--width": "width",
    "--guidance-scale": "guidance_scale",
    "--negative-prompt": "negative_prompt",
    "--num-images": "num_images_per_prompt",
    "--seed": "generator",
}
METRICS_KEYS = ("load_s", "apply_s", "generation_s", "first_image_s", "seconds_per_image", "images",
                "peak_reserved_bytes", "host_peak_rss_bytes", "card", "plan", "budget_bytes", "date")


# -- checks before anything is loaded ---------------------------------------------------------
def validate(*, steps=None, height=None, width=None, num_images=None, repeat=1, guidance_scale=None) -> None:
    """Raise TierquantError (one line) for numbers no pipeline can use."""
    problems = []
    if steps is not None and steps < 1:
        problems.append(f"--steps must be at least 1, got {steps}")
    for flag, v in (("--height", height), ("--width", width)):
        if v is not None and (v <= 0 or v % 8):
            problems.append(f"{flag} must be a positive multiple of 8 (the VAE works on 8x8 pixel patches), got {v}")
    if num_images is not None and num_images < 1:
        problems.append(f"--num-images must be at least 1, got {num_images}")
    if repeat is None or repeat < 1:
        problems.append(f"--repeat must be at least 1, got {repeat}")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        problems.append(f"--guidance-scale must be a finite number, got {guidance_scale}")
    if problems:
        raise TierquantError("; ".join(problems))


def _hw_dict(hw) -> dict:
    return hw.to_dict() if hasattr(hw, "to_dict") else dict(hw)


def _plan_device(plan_hw: dict) -> str:
    if plan_hw.get("device"):
        return plan_hw["device"]
    return "cpu" if plan_hw.get("name") == "cpu" or not plan_hw.get("capability") else "cuda"


def device_mismatch(plan_hw: dict, here_hw) -> tuple[str | None, str | None]:
    """(error, warning) for running a plan made on `plan_hw` (a plan's `hardware` field) here.

    `here_hw` is a Hardware or a dict with at least "device" ("cuda" or "cpu") and "name".
    A plan for another kind of device is an error; one for another card of the same kind runs,
    with a warning naming both cards (its predictions are for the other card).
    """
    here = _hw_dict(here_hw)
    want, got = _plan_device(plan_hw), here.get("device", "cpu")
    plan_name, here_name = str(plan_hw.get("name", "?")), str(here.get("name", "?"))
    if want != got:
        if want == "cuda" and got == "cpu":
            return (f"this plan was made for a CUDA GPU ({plan_name}), but this run would use the CPU: torch sees "
                    f"no CUDA GPU here. Make a plan for this device: `tierquant plan --pipeline NAME --budget SIZE` "
                    f"without --target, or with --target cpu"), None
        if want == "cpu" and got == "cuda":
            return (f"this plan was made for the CPU, but this run would use the CUDA GPU ({here_name}). Make a plan "
                    f"for this device: `tierquant plan --pipeline NAME --budget SIZE` without --target"), None
        return (f"this plan was made for device {want!r} ({plan_name}), but this run would use {got!r} "
                f"({here_name}). Make a plan for this device: `tierquant plan --pipeline NAME --budget SIZE` "
                f"without --target"), None
    if plan_name.lower() != here_name.lower():
        return None, (f"warning: this plan was made for {plan_name}; running on {here_name} "
                      f"(its predictions are for the {plan_name})")
    return None, None


def _here() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "name": "cpu"}
    try:
        return {"device": "cuda", "name": detect().name}
    except HardwareError:  # a card not in the table: its own name
        return {"device": "cuda", "name": torch.cuda.get_device_name(0)}


def accepted_arguments(fn) -> set[str] | None:
    """The argument names `fn` (a pipeline class's or instance's __call__) takes; None if it takes **kwargs."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n in params if n != "self"}


def _default(fn, name: str):
    try:
        p = inspect.signature(fn).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def pipeline_kwargs(accepted: set[str] | None, pipeline_name: str, prompt: str, *, steps=None, height=None,
                    width=None, guidance_scale=None, negative_prompt=None, num_images=None, seed_given=False) -> dict:
    """The keyword arguments for the pipeline's __call__ (the generator excepted: one per generation).

    Only what the user gave, plus what is required (the prompt; PIL output where the pipeline has the
    choice). An option the pipeline does not take is refused, naming the option and the pipeline.
    """
    given = {"--steps": steps, "--height": height, "--width": width, "--guidance-scale": guidance_scale,
             "--negative-prompt": negative_prompt, "--num-images": num_images, "--seed": True if seed_given else None}
    if accepted is not None:
        if "prompt" not in accepted:
            raise UnsupportedOptionError(f"{pipeline_name}'s __call__ takes no 'prompt': tierquant run cannot drive it")
        missing = [f for f, v in given.items() if v is not None and OPTIONS[f] not in accepted]
        if missing:
            what = " or ".join(f"{f} (no '{OPTIONS[f]}' argument)" for f in missing)
            raise UnsupportedOptionError(
                f"{pipeline_name} does not take {what}: leave {'it' if len(missing) == 1 else 'them'} out")
    kw = {"prompt": prompt}
    for flag, v in given.items():
        if v is not None and flag != "--seed":
            kw[OPTIONS[flag]] = v
    if accepted is None or "output_type" in accepted:
        kw["output_type"] = "pil"
    return kw


def _pipeline_class(plan: Plan, pretrained, pipeline):
    """The pipeline class that will run, found without loading weights; None if it cannot be told."""
    if pipeline == "embedded":
        from .pipelines.embedded import EmbeddedPipeline

        return EmbeddedPipeline
    name = None
    if pretrained:
        try:
            name = json.loads((Path(pretrained) / "model_index.json").read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            name = None
    name = name or (plan.pipeline or {}).get("class")
    if not name:
        return None
    import diffusers

    cls = getattr(diffusers, name, None)
    return cls if isinstance(cls, type) else None


# -- files ------------------------------------------------------------------------------------
def slug(prompt: str, limit: int = 40) -> str:
    """Lowercase ASCII words of `prompt` joined by '-', at most `limit` characters (whole words where possible)."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    out = ""
    for w in words:
        nxt = f"{out}-{w}" if out else w
        if len(nxt) > limit:
            if not out:
                out = w[:limit]
            break
        out = nxt
    return out or "image"


def unique_path(folder: Path, stem: str, suffix: str = ".png") -> Path:
    """folder/stem.png, or stem-2.png, stem-3.png, ... : the first that does not exist."""
    path = folder / f"{stem}{suffix}"
    n = 2
    while path.exists():
        path = folder / f"{stem}-{n}{suffix}"
        n += 1
    return path


def _to_pil(img):
    if hasattr(img, "save"):
        return img
    import numpy as np
    from PIL import Image

    a = np.asarray(img.detach().float().cpu() if hasattr(img, "detach") else img)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(a.squeeze(-1) if a.ndim == 3 and a.shape[-1] == 1 else a)


# -- what it took -----------------------------------------------------------------------------
def seconds_per_image(generation_s: list[float], images_per_generation: int) -> tuple[float, str]:
    """Seconds per image and how it was found: the median over the generations after the first
    (which pays for warm-up and compiling) when there are two or more, else the single one."""
    n = max(1, images_per_generation)
    if len(generation_s) >= 2:
        rest = generation_s[1:]
        how = (f"median of {len(rest)} after the first" if len(rest) > 1 else "the one after the first")
        return statistics.median(rest) / n, f"{how}, which took {generation_s[0]:.1f} s"
    return generation_s[0] / n, "one generation, warm-up included"


def host_peak_rss() -> int | None:
    """The process's peak resident set size (VmHWM) in bytes; None where /proc cannot tell."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                value, unit = line.split()[1:3]
                return int(value) * {"kB": 1024, "mB": 1024**2, "gB": 1024**3}.get(unit, 1024)
    except (OSError, ValueError, IndexError):
        pass
    return None


def summary_line(images: int, generation_s: list[float], images_per_generation: int, peak_bytes: int | None,
                 where: str) -> str:
    """The last line of a run, e.g. `4 images in 11.62 s: 2.90 s per image (median of 3 after the first,
    which took 5.2 s), peak 20.41 GiB on NVIDIA H200` (one line)."""
    per, how = seconds_per_image(generation_s, images_per_generation)
    peak = f", peak {gib(peak_bytes)}" if peak_bytes is not None else ""
    return (f"{images} image{'s' if images != 1 else ''} in {sum(generation_s):.2f} s: {per:.2f} s per image "
            f"({how}){peak} on {where}")


# -- the run ----------------------------------------------------------------------------------
def _open(plan_path, prompt, *, pretrained, pipeline, steps, height, width, guidance_scale, negative_prompt,
          num_images, seed, repeat, budget):
    """Everything before the first image, for `run` and `compile_plan`: check every option before
    any weights are read, cap the GPU at the budget, load and apply."""
    validate(steps=steps, height=height, width=width, num_images=num_images, repeat=repeat,
             guidance_scale=guidance_scale)
    budget_bytes = parse_budget(budget) if budget is not None else None
    import torch

    p = Plan.load(plan_path)
    budget_bytes = budget_bytes or p.budget_bytes
    error, warning = device_mismatch(p.hardware, _here())
    if error:
        raise DeviceMismatchError(error)
    if warning:
        print(warning, file=sys.stderr)
    if pipeline != "embedded" and not pretrained:
        raise TierquantError("say which pipeline: --pretrained PATH (a diffusers folder) or --pipeline embedded")
    options = dict(steps=steps, height=height, width=width, guidance_scale=guidance_scale,
                   negative_prompt=negative_prompt, num_images=num_images, seed_given=seed is not None)
    cls = _pipeline_class(p, pretrained, pipeline)
    if cls is not None:  # refuse options the pipeline does not take before reading any weights
        pipeline_kwargs(accepted_arguments(cls.__call__), cls.__name__, prompt, **options)

    cuda = torch.cuda.is_available()
    if cuda:  # the plan's promise as a hard cap: torch raises rather than go over it
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), 0)
    compiles = any(c.compile for c in p.components.values())

    try:
        t0 = time.perf_counter()
        if pipeline == "embedded":
            from .pipelines.embedded import load_embedded_pipeline

            pipe = load_embedded_pipeline(device="cuda" if cuda else "cpu")
            t1 = time.perf_counter()
            pipe = apply(pipe, p)
            _sync(cuda)
            load_s, apply_s = t1 - t0, time.perf_counter() - t1
        else:  # from_pretrained quantizes while loading: one figure for both
            pipe = load(pretrained, p)
            _sync(cuda)
            load_s, apply_s = time.perf_counter() - t0, None
    except torch.cuda.OutOfMemoryError as e:
        raise _over_budget(e, budget_bytes, "loading") from None

    return p, pipe, cuda, budget_bytes, compiles, load_s, apply_s, options


def compile_plan(plan_path, prompt: str = "a photo of a cat", *, pretrained=None, pipeline=None, height=None,
                 width=None, num_images=None, budget=None, as_json: bool = False, packages: str | None = None) -> dict:
    """`tierquant compile PLAN`: load and apply as `run` does, compile once for the sizes given and save
    torch's artifacts beside the plan (`compilation.prepare`); `packages` (an `aot.KINDS`) also makes
    ahead-of-time packages, not by default: on an H100 they started a process slower (docs/compile.md)."""
    compilation.check_packages(packages)
    p, pipe, _, _, compiles, _, _, options = _open(
        plan_path, prompt, pretrained=pretrained, pipeline=pipeline, steps=None, height=height, width=width,
        guidance_scale=None, negative_prompt=None, num_images=num_images, seed=None, repeat=1, budget=budget)
    if not compiles:
        raise TierquantError(f"{plan_path} compiles no component: nothing to prepare")
    kwargs = pipeline_kwargs(accepted_arguments(type(pipe).__call__), type(pipe).__name__, prompt, **options)
    report = compilation.prepare(pipe, p, kwargs, plan_path=plan_path, packages=packages)
    print(json.dumps(report.to_dict(), indent=1) if as_json else "\n".join(report.lines()))
    return report.to_dict()


def run(plan_path, prompt: str, *, pretrained=None, pipeline=None, steps=None, height=None, width=None,
        guidance_scale=None, negative_prompt=None, num_images=None, seed=None, repeat=1, budget=None,
        metrics=None, out="tierquant-out") -> dict:
    """Apply the plan at `plan_path` to a pipeline, generate `repeat` times (seeds seed, seed+1, ...),
    write PNGs under `out`, print their paths and a summary line on stdout; returns the metrics dict
    (also written to `metrics` as JSON when given)."""
    p, pipe, cuda, budget_bytes, compiles, load_s, apply_s, options = _open(
        plan_path, prompt, pretrained=pretrained, pipeline=pipeline, steps=steps, height=height, width=width,
        guidance_scale=guidance_scale, negative_prompt=negative_prompt, num_images=num_images, seed=seed,
        repeat=repeat, budget=budget)
    first_seed = 0 if seed is None else seed
    import torch

    # Before the first image: AOT packages made by `tierquant compile` for this plan and card, else
    # torch's compile artifacts beside the plan (`<plan>.compile-cache.bin`), else compile at the
    # first call (compilation.restore says which on stderr).
    started = compilation.restore(pipe, p, plan_path=plan_path) if compiles else None

    name = type(pipe).__name__
    call = type(pipe).__call__
    accepted = accepted_arguments(call)
    kwargs = pipeline_kwargs(accepted, name, prompt, **options)
    takes_generator = accepted is None or "generator" in accepted
    if negative_prompt is not None and accepted and "true_cfg_scale" in accepted \
            and (_default(call, "true_cfg_scale") or 1.0) <= 1.0:
        print(f"note: {name} uses a negative prompt only with true_cfg_scale > 1, which tierquant run leaves at "
              f"its default: --negative-prompt has no effect here", file=sys.stderr)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # ours instead: one bar over all generations
    steps_each = steps if steps is not None else _default(call, "num_inference_steps")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = slug(prompt)
    paths: list[str] = []
    generation_s: list[float] = []
    per_generation = 0
    from rich.console import Console
    from rich.progress import Progress

    try:
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("denoising", total=steps_each * repeat if steps_each else None)
            with _step_hook(pipe, accepted, lambda: bar.advance(task)) as extra:
                for r in range(repeat):
                    s = first_seed + r
                    gen = {"generator": torch.Generator("cpu").manual_seed(s)} if takes_generator else {}
                    t = time.perf_counter()
                    try:
                        result = pipe(**kwargs, **gen, **extra)
                    except torch.cuda.OutOfMemoryError as e:
                        raise _over_budget(e, budget_bytes, "generating") from None
                    except TierquantError:
                        raise
                    except ValueError as e:  # the pipeline's own input checks
                        raise TierquantError(f"{name} refused the call: {e}") from None
                    _sync(cuda)
                    generation_s.append(time.perf_counter() - t)
                    images = result.images if hasattr(result, "images") else result[0]
                    per_generation = len(images)
                    for i, img in enumerate(images):
                        path = unique_path(out, f"{stem}-{s}-{i}")
                        _to_pil(img).save(path)
                        paths.append(str(path))
    finally:
        if paths:
            print("\n".join(paths))  # plain: paths must not be wrapped

    if started is not None:  # what this process compiled (nothing where AOT packages ran), for the next one
        compilation.save_artifacts(compilation.artifacts_path(plan_path))

    per, _ = seconds_per_image(generation_s, per_generation)
    peak_reserved = torch.cuda.max_memory_reserved() if cuda else None
    rss = host_peak_rss()
    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(summary_line(len(paths), generation_s, per_generation, peak_reserved if cuda else rss,
                       card if cuda else "CPU"))
    m = {"load_s": load_s, "apply_s": apply_s, "generation_s": generation_s, "first_image_s": generation_s[0],
         "seconds_per_image": per, "images": len(paths), "peak_reserved_bytes": peak_reserved,
         "host_peak_rss_bytes": rss, "card": card, "plan": str(plan_path), "budget_bytes": budget_bytes,
         "date": datetime.date.today().isoformat()}
    if compiles:  # where the first image's compiling went (dynamo's timers and counters)
        m["compile"] = compilation.compile_stats()
    if metrics:
        mpath = Path(metrics)
        mpath.parent.mkdir(parents=True, exist_ok=True)
        mpath.write_text(json.dumps(m, indent=1) + "\n")
    return m


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _over_budget(e, budget_bytes: int, doing: str) -> TierquantError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return TierquantError(f"out of GPU memory while {doing}, within the budget of {gib(budget_bytes)} "
                          f"({first}); give a larger --budget or make a plan for a smaller one")


class _step_hook:
    """Calls `advance` once per denoising step: through callback_on_step_end where the pipeline takes
    it (the extra call kwargs), else by wrapping its scheduler's step for the duration."""

    def __init__(self, pipe, accepted: set[str] | None, advance):
        self.pipe, self.accepted, self.advance = pipe, accepted, advance
        self.scheduler = None

    def __enter__(self) -> dict:
        if self.accepted is not None and "callback_on_step_end" in self.accepted:
            def on_step(_pipe, _i, _t, kw):
                self.advance()
                return kw

            return {"callback_on_step_end": on_step}
        sched = getattr(self.pipe, "scheduler", None)
        step = getattr(sched, "step", None)
        if callable(step):
            def counted(*a, **k):
                self.advance()
                return step(*a, **k)

            self.scheduler = sched
            sched.step = counted  # an instance attribute: removed on exit
        return {}

    def __exit__(self, *exc):
        if self.scheduler is not None:
            del self.scheduler.step
        return False
