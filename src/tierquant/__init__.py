"""tierquant: per-component quantization, placement and compilation for diffusion pipelines.

    profile = tierquant.profile(pipe, prompt="...", num_inference_steps=28)
    plan = tierquant.plan(profile, budget="24GiB", target="rtx4090")
    pipe = tierquant.apply(pipe, plan)
"""
import logging

# torchao logs a warning for each optional CUDA extension a CPU build cannot load; they are noise here.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

# Submodules named like the functions below (plan, profile) are imported first, so that the
# functions, defined after, are what `tierquant.plan` and `tierquant.profile` mean.
from .errors import (BackendMissingError, HardwareError, NoPlanError, PlanError, PlanMismatchError,  # noqa: E402
                     PlanNotRunnableError, SchemeError, TierquantError)
from .hardware import Hardware, parse_budget  # noqa: E402
from .plan import Choice, Plan  # noqa: E402
from .profile import ComponentProfile, Phase, Profile  # noqa: E402

__version__ = "0.1.0"


def profile(pipe, **call_kwargs) -> Profile:
    """Run `pipe(**call_kwargs)` once with hooks on its components and return what each one cost."""
    from .profiler import profile as _profile

    return _profile(pipe, **call_kwargs)


def plan(pipe_or_profile, budget, target=None, tolerance=None, pin=None, catalog=None, steps=None,
         measure: bool | None = None, **call_kwargs) -> Plan:
    """The fastest plan for a pipeline (or a Profile, or a built-in pipeline's name) within `budget`.

    target: a name from hardware.TARGETS to plan for another card (roofline model), or None for the
    running device (micro-benchmarks of the real layer shapes where affordable, cached on disk).
    pin: {"component": "scheme"} fixes schemes; the planner optimises the rest.
    steps: the denoising steps to plan for (default: the call's num_inference_steps, else the
    profile's, else the built-in pipeline's recommended count).
    The search itself is `planner.make_plan`, a pure function; this front door gathers its inputs.
    """
    from .hardware import resolve
    from .planner import make_plan
    from .schemes import CATALOG

    hw = resolve(target)
    budget_bytes = parse_budget(budget)
    if isinstance(catalog, (list, tuple, set)):
        catalog = {s: CATALOG[s] for s in catalog}
    steps = steps or call_kwargs.get("num_inference_steps")
    if isinstance(pipe_or_profile, Profile):
        prof = pipe_or_profile
    elif isinstance(pipe_or_profile, str):
        from .pipelines.builtin import default_call, profile_builtin

        prof = profile_builtin(pipe_or_profile, **call_kwargs)
        steps = steps or default_call(pipe_or_profile).get("num_inference_steps")
    else:
        prof = profile(pipe_or_profile, **call_kwargs)
    if steps:
        prof = prof.scaled(steps)
    timings = None
    if target is None and measure is not False:
        from .calibrate import timings_for

        timings = timings_for(prof, hw, catalog or CATALOG, force=bool(measure))
    return make_plan(prof, hw, budget_bytes, catalog=catalog, tolerance=tolerance, pin=pin, timings=timings)


def apply(pipe, plan: Plan, **kwargs):
    """Quantize, place and compile `pipe`'s components as `plan` says (see applier.apply)."""
    from .applier import apply as _apply

    return _apply(pipe, plan, **kwargs)


def load(path_or_repo_id, plan: Plan, **from_pretrained_kwargs):
    """Load a pipeline checkpoint, quantizing while loading, and apply `plan` (see checkpoint.load)."""
    from .checkpoint import load as _load

    return _load(path_or_repo_id, plan, **from_pretrained_kwargs)


def save(pipe, path):
    """Save an applied pipeline so that it loads back quantized (see checkpoint.save_applied)."""
    from .checkpoint import save_applied

    return save_applied(pipe, path)


def compare(reference_pipe, candidate_pipe, prompts, seeds, **call_kwargs):
    """Image and adherence metrics of `candidate_pipe` against `reference_pipe` at the same seeds."""
    from .quality import compare as _compare

    return _compare(reference_pipe, candidate_pipe, prompts, seeds, **call_kwargs)


__all__ = ["profile", "plan", "apply", "load", "save", "compare", "Plan", "Choice", "Profile", "ComponentProfile",
           "Phase", "Hardware", "parse_budget", "TierquantError", "PlanError", "PlanMismatchError",
           "PlanNotRunnableError", "NoPlanError", "SchemeError", "HardwareError", "BackendMissingError"]
