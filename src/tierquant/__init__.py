"""tierquant: per-component quantization, placement and compilation for diffusion pipelines.

    profile = tierquant.profile(pipe, prompt="...", num_inference_steps=28)
    plan = tierquant.plan(profile, budget="24GiB", target="rtx4090")
    pipe = tierquant.apply(pipe, plan)

Every function here checks its arguments before it does any work: a bad one raises a
TierquantError subclass whose message names it, and leaves a given pipeline as it was.
"""
from . import quiet  # noqa: F401  (drops known-harmless backend messages, narrowly)

# Submodules named like the functions below (plan, profile) are imported first, so that the
# functions, defined after, are what `tierquant.plan` and `tierquant.profile` mean.
from .errors import (BackendMissingError, HardwareError, NoPlanError, PlanError, PlanMismatchError,  # noqa: E402
                     PlanNotRunnableError, SchemeError, TierquantError, UnsupportedOptionError)
from .hardware import Hardware, parse_budget  # noqa: E402
from .plan import Choice, Plan  # noqa: E402
from .profile import ComponentProfile, Phase, Profile  # noqa: E402
from . import arguments as A  # noqa: E402

__version__ = "0.1.0"


def profile(pipe, **call_kwargs) -> Profile:
    """Run `pipe(**call_kwargs)` once with hooks on its components and return what each one cost.

    Use a short run (num_inference_steps=2, say): the profile records the pipeline's own step count
    (`Profile.default_steps`), and `plan` plans for that many unless given `steps`.
    """
    from .profiler import profile as _profile

    A.check_pipe(pipe)
    A.check_call(pipe, call_kwargs)
    return _profile(pipe, **call_kwargs)


def plan(pipe_or_profile, budget, target=None, tolerance=None, pin=None, catalog=None, steps=None,
         measure: bool | None = None, remeasure: bool = False, images: int | None = None, **call_kwargs) -> Plan:
    """The fastest plan for a pipeline (or a Profile, or a built-in pipeline's name) within `budget`.

    target: a name from hardware.TARGETS to plan for another card (roofline model), or None for the
    running device (micro-benchmarks of the real layer shapes where affordable, cached on disk).
    pin: {"component": "scheme"} fixes schemes; the planner optimises the rest.
    steps: the denoising steps to plan for. Default: the call's num_inference_steps (when planning
    from a pipeline); for a Profile, the pipeline's own step count (`Profile.default_steps`) when the
    profile was made with fewer (a short profiling run), else the profile's; for a built-in, its
    recommended count. The plan says which (`plan.steps`, and a note when it was scaled).
    measure: False never benchmarks (roofline only); True benchmarks even where it would be slow.
    remeasure: ignore the cached layer timings of this device and measure them again.
    images: how many images this process will make; compilation is then charged its compile time
    spread over them (images=1 compiles only what pays back within one image). None: many.
    Several cards: budget=["12GiB", "12GiB"] (or "12GiB,12GiB") plans over that many cards, target
    being one card's name for all, one per budget, or None for the GPUs here (`devices.plan_devices`:
    each component gets a card too, or the denoiser runs context-parallel; roofline times).
    The search itself is `planner.make_plan`, a pure function; this front door gathers its inputs.
    """
    from .hardware import resolve
    from .planner import make_plan
    from .schemes import CATALOG

    budgets = A.check_budgets(budget)
    budget_bytes = budgets[0]
    hws = A.check_targets(target, len(budgets), resolve) if len(budgets) > 1 else None
    hw = hws[0] if hws else A.check_target(target, resolve)
    tolerance = A.check_tolerance(tolerance)
    steps = A.check_steps(steps, "steps")
    catalog = A.check_catalog(catalog)
    pin = A.check_pin(pin)
    if measure is not None and not isinstance(measure, bool):
        raise TierquantError(f"measure must be True, False or None, got {measure!r}")
    if not isinstance(remeasure, bool):
        raise TierquantError(f"remeasure must be True or False, got {remeasure!r}")
    if remeasure and measure is False:
        raise TierquantError("remeasure=True asks to measure again, measure=False not to measure: pass one of them")
    if "num_inference_steps" in call_kwargs:
        A.check_steps(call_kwargs["num_inference_steps"], "num_inference_steps")
    steps = steps or call_kwargs.get("num_inference_steps")
    notes = []
    if isinstance(pipe_or_profile, Profile):
        prof = pipe_or_profile
        A.check_pin_names(pin, prof.components)
        other = [k for k in call_kwargs if k != "num_inference_steps"]
        if other:
            raise TierquantError(f"call options ({', '.join(other)}) only apply when planning from a pipeline; "
                                 "this is a Profile, already measured: profile again with them")
        short = prof.steps and prof.default_steps and prof.steps < prof.default_steps
        if steps is None and short:
            steps = prof.default_steps
            notes.append(f"planned for {steps} denoising steps, {prof.pipeline}'s default; the profile ran "
                         f"{prof.steps}. Pass steps= (--steps) to plan for another count")
    elif isinstance(pipe_or_profile, str):
        from .pipelines.builtin import default_call, names, profile_builtin

        if pipe_or_profile not in names():
            raise TierquantError(f"unknown built-in pipeline {pipe_or_profile!r}: the built-ins are {', '.join(names())}; "
                                 "or pass a pipeline object or a Profile")
        prof = profile_builtin(pipe_or_profile, **call_kwargs)
        A.check_pin_names(pin, prof.components)
        steps = steps or default_call(pipe_or_profile).get("num_inference_steps")
    else:
        A.check_pipe(pipe_or_profile)
        from .components import discover

        A.check_pin_names(pin, discover(pipe_or_profile))
        A.check_call(pipe_or_profile, call_kwargs)
        prof = profile(pipe_or_profile, **call_kwargs)
    if steps:
        prof = prof.scaled(steps)
    timings = None
    if target is None and measure is not False and not hws:
        from dataclasses import replace

        from .calibrate import host_link, timings_for

        link = host_link(hw, remeasure=remeasure)
        if link:  # the running card's own host link, measured once, for streaming and swapping
            hw = replace(hw, host_link=link)
            notes.append(f"host link measured on this device: {link / 1e9:.1f} GB/s")
        timings = timings_for(prof, hw, catalog or CATALOG, force=bool(measure), remeasure=remeasure)
        if timings is not None and timings.flags:
            notes.append(f"{len(timings.flags)} layer timings were implausible twice (a busy or cold machine?) and were "
                         "estimated from the roofline; they are measured again next time (or now, with remeasure=True)")
    if images is not None and (not A.is_int(images) or images < 1):
        raise TierquantError(f"images must be a whole number of images, at least 1; got {images!r}")
    if hws:
        from .devices import plan_devices

        result = plan_devices(prof, hws, budgets, catalog=catalog, tolerance=tolerance, pin=pin, images=images)
    else:
        result = make_plan(prof, hw, budget_bytes, catalog=catalog, tolerance=tolerance, pin=pin, timings=timings,
                           images=images)
    result.notes.extend(notes)
    return result


def apply(pipe, plan: Plan, device=None, progress: bool = True):
    """Quantize, place and compile `pipe`'s components as `plan` says (see applier.apply; a plan over
    several cards: multiapply.apply, each component on its card, or context parallelism)."""
    from .multiapply import apply_plan as _apply

    A.check_pipe(pipe)
    A.check_plan(plan)
    A.check_device(device)
    return _apply(pipe, plan, device=device, progress=bool(progress))


def load(path_or_repo_id, plan: Plan, **from_pretrained_kwargs):
    """Load a pipeline checkpoint, quantizing while loading, and apply `plan` (see checkpoint.load)."""
    from .multiapply import load_plan as _load

    A.check_plan(plan)
    A.check_checkpoint(path_or_repo_id)
    A.check_device(from_pretrained_kwargs.get("device"))
    try:
        return _load(path_or_repo_id, plan, **from_pretrained_kwargs)
    except OSError as e:  # unreadable files, a repo id that is not in the local cache (offline), ...
        raise TierquantError(f"cannot load a pipeline from {str(path_or_repo_id)!r}: {e}") from e


def save(pipe, path):
    """Save an applied pipeline so that it loads back quantized (see checkpoint.save_applied).

    Load it back with `DiffusionPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)`: without
    `torch_dtype`, diffusers loads the components that were not quantized (a bf16 VAE, say) in
    float32 beside bf16 ones, and generation stops on the mismatch ("Input type (c10::BFloat16) and
    bias type (float) should be the same").
    """
    from pathlib import Path

    from .checkpoint import save_applied

    A.check_pipe(pipe)
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise TierquantError(f"path must be a folder name (str or Path), got {path!r:.60}")
    if Path(path).exists() and not Path(path).is_dir():
        raise TierquantError(f"cannot save to {str(path)!r}: it is a file; pass a folder")
    return save_applied(pipe, path)


def compare(reference_pipe, candidate_pipe, prompts, seeds=None, **call_kwargs):
    """Image and adherence metrics of `candidate_pipe` against `reference_pipe` at the same seeds."""
    from .quality import compare as _compare

    return _compare(reference_pipe, candidate_pipe, prompts, seeds, **call_kwargs)


# -- argument checks: each raises a TierquantError that names the argument ------------------------

__all__ = ["profile", "plan", "apply", "load", "save", "compare", "Plan", "Choice", "Profile", "ComponentProfile",
           "Phase", "Hardware", "parse_budget", "TierquantError", "PlanError", "PlanMismatchError",
           "PlanNotRunnableError", "NoPlanError", "SchemeError", "HardwareError", "BackendMissingError",
           "UnsupportedOptionError"]
