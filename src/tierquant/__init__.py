"""tierquant: per-component quantization, placement and compilation for diffusion pipelines.

    profile = tierquant.profile(pipe, prompt="...", num_inference_steps=28)
    plan = tierquant.plan(profile, budget="24GiB", target="rtx4090")
    pipe = tierquant.apply(pipe, plan)

Every function here checks its arguments before it does any work: a bad one raises a
TierquantError subclass whose message names it, and leaves a given pipeline as it was.
"""
import logging
import re

# torchao logs a warning for each optional CUDA extension a CPU build cannot load; they are noise here.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


class _DropHarmless(logging.Filter):
    """Drops one logger's records whose message matches `pattern`; everything else passes."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.pattern.search(record.getMessage())
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is not ours to drop
            return True


# Warnings the backends print on every run that say nothing about the user's work, each matched
# narrowly, on the logger that emits it:
# - diffusers (0.42) with torchao 0.18: its torch.load safe-globals list names torchao classes that
#   moved; tierquant saves diffusers models holding torchao tensors with torch.save and loads them back.
# - bitsandbytes on a CPU with AVX512-BF16: an optional faster kernel package (`kernels`) is missing;
#   its own CPU kernels run instead.
# - diffusers' ModelMixin.to(dtype) warns about modules to keep in float32 even when there are none.
_HARMLESS = {
    "diffusers.quantizers.torchao.torchao_quantizer": r"^Unable to import `torchao` Tensor objects",
    "bitsandbytes.backends.cpu.ops": r"^Failed to load CPU gemm_4bit_forward from kernels-community",
    "diffusers.models.modeling_utils": r"that should be kept in float32: \[\]\.",
}
for _name, _pattern in _HARMLESS.items():
    logging.getLogger(_name).addFilter(_DropHarmless(_pattern))

# Submodules named like the functions below (plan, profile) are imported first, so that the
# functions, defined after, are what `tierquant.plan` and `tierquant.profile` mean.
from .errors import (BackendMissingError, HardwareError, NoPlanError, PlanError, PlanMismatchError,  # noqa: E402
                     PlanNotRunnableError, SchemeError, TierquantError, UnsupportedOptionError)
from .hardware import Hardware, parse_budget  # noqa: E402
from .plan import Choice, Plan  # noqa: E402
from .profile import ComponentProfile, Phase, Profile  # noqa: E402

__version__ = "0.1.0"


def profile(pipe, **call_kwargs) -> Profile:
    """Run `pipe(**call_kwargs)` once with hooks on its components and return what each one cost.

    Use a short run (num_inference_steps=2, say): the profile records the pipeline's own step count
    (`Profile.default_steps`), and `plan` plans for that many unless given `steps`.
    """
    from .profiler import profile as _profile

    _check_pipe(pipe)
    _check_call(pipe, call_kwargs)
    return _profile(pipe, **call_kwargs)


def plan(pipe_or_profile, budget, target=None, tolerance=None, pin=None, catalog=None, steps=None,
         measure: bool | None = None, remeasure: bool = False, **call_kwargs) -> Plan:
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
    The search itself is `planner.make_plan`, a pure function; this front door gathers its inputs.
    """
    from .hardware import resolve
    from .planner import make_plan
    from .schemes import CATALOG

    budget_bytes = _check_budget(budget)
    hw = _check_target(target, resolve)
    tolerance = _check_tolerance(tolerance)
    steps = _check_steps(steps, "steps")
    catalog = _check_catalog(catalog)
    pin = _check_pin(pin)
    if measure is not None and not isinstance(measure, bool):
        raise TierquantError(f"measure must be True, False or None, got {measure!r}")
    if not isinstance(remeasure, bool):
        raise TierquantError(f"remeasure must be True or False, got {remeasure!r}")
    if remeasure and measure is False:
        raise TierquantError("remeasure=True asks to measure again, measure=False not to measure: pass one of them")
    if "num_inference_steps" in call_kwargs:
        _check_steps(call_kwargs["num_inference_steps"], "num_inference_steps")
    steps = steps or call_kwargs.get("num_inference_steps")
    notes = []
    if isinstance(pipe_or_profile, Profile):
        prof = pipe_or_profile
        _check_pin_names(pin, prof.components)
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
        _check_pin_names(pin, prof.components)
        steps = steps or default_call(pipe_or_profile).get("num_inference_steps")
    else:
        _check_pipe(pipe_or_profile)
        from .components import discover

        _check_pin_names(pin, discover(pipe_or_profile))
        _check_call(pipe_or_profile, call_kwargs)
        prof = profile(pipe_or_profile, **call_kwargs)
    if steps:
        prof = prof.scaled(steps)
    timings = None
    if target is None and measure is not False:
        from .calibrate import timings_for

        timings = timings_for(prof, hw, catalog or CATALOG, force=bool(measure), remeasure=remeasure)
        if timings is not None and timings.flags:
            notes.append(f"{len(timings.flags)} layer timings were implausible twice (a busy or cold machine?) and were "
                         "estimated from the roofline; they are measured again next time (or now, with remeasure=True)")
    result = make_plan(prof, hw, budget_bytes, catalog=catalog, tolerance=tolerance, pin=pin, timings=timings)
    result.notes.extend(notes)
    return result


def apply(pipe, plan: Plan, device=None, progress: bool = True):
    """Quantize, place and compile `pipe`'s components as `plan` says (see applier.apply)."""
    from .applier import apply as _apply

    _check_pipe(pipe)
    _check_plan(plan)
    _check_device(device)
    return _apply(pipe, plan, device=device, progress=bool(progress))


def load(path_or_repo_id, plan: Plan, **from_pretrained_kwargs):
    """Load a pipeline checkpoint, quantizing while loading, and apply `plan` (see checkpoint.load)."""
    from .checkpoint import load as _load

    _check_plan(plan)
    _check_checkpoint(path_or_repo_id)
    _check_device(from_pretrained_kwargs.get("device"))
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

    _check_pipe(pipe)
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

def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_steps(steps, name: str):
    if steps is None:
        return None
    if not _is_int(steps) or steps < 1:
        raise TierquantError(f"{name} must be a whole number of denoising steps, at least 1; got {steps!r}")
    return steps


def _check_tolerance(tolerance):
    import math

    if tolerance is None:
        return None
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) \
            or tolerance < 0:
        raise TierquantError(f"tolerance must be a number >= 0 (the expected error allowed per component, "
                             f"1 - cosine of its output, e.g. 0.01); got {tolerance!r}")
    return float(tolerance)


def _check_budget(budget) -> int:
    import math

    if budget is None:
        raise HardwareError("a budget is needed: write it like 24GiB, 16GB, 12000MiB, or a number of bytes")
    if isinstance(budget, str) and re.fullmatch(r"\s*[0-9]*\.?[0-9]+\s*", budget):
        raise HardwareError(f"budget {budget!r} has no unit: write {budget.strip()}GiB (or GB, MiB, ...), "
                            "or pass a number of bytes as an int")
    if isinstance(budget, float) and not math.isfinite(budget):
        raise HardwareError(f"budget must be a finite number of bytes, got {budget!r}")
    if not isinstance(budget, (str, int, float)) or isinstance(budget, bool):
        raise HardwareError(f"budget must be a string like 24GiB or a number of bytes, got {type(budget).__name__}")
    return parse_budget(budget)


def _check_target(target, resolve) -> Hardware:
    if target is not None and not isinstance(target, (str, Hardware)):
        raise HardwareError(f"target must be a card's name (e.g. 'rtx4090'), a Hardware or None, got {target!r:.60}")
    return resolve(target)


def _check_catalog(catalog):
    from .schemes import CATALOG, Scheme

    if catalog is None:
        return None
    if isinstance(catalog, str):
        catalog = [catalog]
    if isinstance(catalog, (list, tuple, set, frozenset)):
        unknown = [s for s in catalog if s not in CATALOG]
        if unknown or not catalog:
            raise SchemeError(f"catalog must name known schemes ({', '.join(CATALOG)}); got {sorted(map(str, catalog))}")
        return {s: CATALOG[s] for s in catalog}
    if isinstance(catalog, dict) and catalog and all(isinstance(v, Scheme) for v in catalog.values()):
        return catalog
    raise SchemeError(f"catalog must be a list of scheme names or a dict of Schemes, got {catalog!r:.60}")


def _check_pin(pin):
    from .schemes import CATALOG

    if pin is None:
        return None
    if not isinstance(pin, dict):
        raise TierquantError(f"pin must be a dict {{component: scheme}}, e.g. {{'transformer': 'int8-weight'}}; "
                             f"got a {type(pin).__name__}")
    for name, scheme in pin.items():
        if not isinstance(name, str) or not isinstance(scheme, str):
            raise TierquantError(f"pin must map component names to scheme names (strings); got {name!r}: {scheme!r}")
        if scheme not in CATALOG:
            raise SchemeError(f"cannot pin {name!r} to unknown scheme {scheme!r}: choose one of {', '.join(CATALOG)}")
    return pin


def _check_pin_names(pin, components) -> None:
    for name in pin or {}:
        if name not in components:
            raise TierquantError(f"cannot pin {name!r}: the pipeline has no such component "
                                 f"(it has {', '.join(components)})")


def _check_pipe(pipe) -> None:
    """A pipeline: callable, with torch modules among its components (or attributes)."""
    from .components import discover

    if isinstance(pipe, (Plan, Profile)) or not callable(pipe) or isinstance(pipe, type):
        raise TierquantError(f"expected a pipeline (a diffusers DiffusionPipeline, or a callable object whose "
                             f"attributes are its torch modules), got {type(pipe).__name__} {pipe!r:.40}")
    if not discover(pipe):
        raise TierquantError(f"{type(pipe).__name__} has no torch.nn.Module components: pass a diffusers pipeline "
                             "(or an object whose attributes are its models)")


def _check_call(pipe, call_kwargs: dict) -> None:
    """The pipeline's __call__ takes every option given, and the step count is a positive int."""
    import inspect

    if "num_inference_steps" in call_kwargs:
        _check_steps(call_kwargs["num_inference_steps"], "num_inference_steps")
    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in call_kwargs if k not in params]
    if unknown:
        raise UnsupportedOptionError(f"{type(pipe).__name__} does not take {', '.join(map(repr, unknown))}; "
                                     f"its options are {', '.join(p for p in params if p != 'self')}")


def _check_plan(plan) -> None:
    if not isinstance(plan, Plan):
        raise PlanError(f"expected a tierquant Plan (from tierquant.plan(...) or tierquant.Plan.load(path)), "
                        f"got {type(plan).__name__} {plan!r:.40}")


def _check_device(device) -> None:
    if device is None:
        return
    import torch

    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise PlanNotRunnableError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r:.40}") from None


def _check_checkpoint(path) -> None:
    """A local pipeline folder (with model_index.json), or what looks like a hub repo id (org/name)."""
    from pathlib import Path

    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise TierquantError(f"expected a pipeline folder or a hub repo id (org/name), got {path!r:.60}")
    p = Path(path)
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise TierquantError(f"{str(path)!r} is a folder but not a diffusers pipeline: it has no model_index.json")
        return
    if p.exists():
        raise TierquantError(f"{str(path)!r} is a file: pass the pipeline's folder (the one with model_index.json)")
    if isinstance(path, Path) or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) or str(path).startswith((".", "/")):
        raise TierquantError(f"no pipeline folder at {str(path)!r} (and it is not a hub repo id like org/name)")


__all__ = ["profile", "plan", "apply", "load", "save", "compare", "Plan", "Choice", "Profile", "ComponentProfile",
           "Phase", "Hardware", "parse_budget", "TierquantError", "PlanError", "PlanMismatchError",
           "PlanNotRunnableError", "NoPlanError", "SchemeError", "HardwareError", "BackendMissingError"]
