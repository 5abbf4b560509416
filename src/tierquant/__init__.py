"""tierquant: per-component quantization, placement and compilation for diffusion pipelines.

    profile = tierquant.profile(pipe, prompt="...", num_inference_steps=2)
    plan = tierquant.plan(profile, budget="24GiB", target="rtx4090")
    pipe = tierquant.apply(pipe, plan)
"""
import logging

# torchao logs a warning for each optional CUDA extension a CPU build cannot load; they are noise here.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from .hardware import Hardware, parse_budget  # noqa: E402
from .plan import Choice, Plan, PlanError  # noqa: E402
from .profiling import ComponentProfile, Phase, Profile  # noqa: E402

__version__ = "0.1.0"


def profile(pipe, **call_kwargs) -> Profile:
    """Run `pipe(**call_kwargs)` once with hooks on its components and return what each one cost."""
    from .measure import profile as _profile

    return _profile(pipe, **call_kwargs)


def plan(pipe_or_profile, budget, target=None, tolerance=None, pin=None, **call_kwargs) -> Plan:
    """The fastest per-component plan that fits `budget` (see planner.plan)."""
    from .planner import plan as _plan

    return _plan(pipe_or_profile, budget=budget, target=target, tolerance=tolerance, pin=pin, **call_kwargs)


def apply(pipe, plan: Plan, **kwargs):
    """Quantize, place and compile `pipe`'s components as `plan` says (see apply.apply)."""
    from .applier import apply as _apply

    return _apply(pipe, plan, **kwargs)


def load(path_or_repo_id, plan: Plan, **from_pretrained_kwargs):
    """Load a pipeline checkpoint, quantizing while loading, and apply `plan`."""
    from .applier import load as _load

    return _load(path_or_repo_id, plan, **from_pretrained_kwargs)


def compare(reference_pipe, candidate_pipe, prompts, seeds, **call_kwargs):
    """Image and adherence metrics of `candidate_pipe` against `reference_pipe` at the same seeds."""
    from .quality import compare as _compare

    return _compare(reference_pipe, candidate_pipe, prompts, seeds, **call_kwargs)


__all__ = ["profile", "plan", "apply", "load", "compare", "Plan", "Choice", "PlanError", "Profile",
           "ComponentProfile", "Phase", "Hardware", "parse_budget"]
