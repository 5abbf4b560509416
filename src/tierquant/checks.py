"""Check everything, change nothing: whether a plan can be applied to this pipeline on this device.

Every check runs before a single tensor moves, and each failure says what is wrong and what to do:
the plan was made for another pipeline (`PlanMismatchError`), a scheme or placement cannot run here
(`PlanNotRunnableError`), a backend library is missing (`BackendMissingError`), or what the plan
keeps on the device does not fit its budget.
"""
from __future__ import annotations

import torch
from torch import nn

from . import components as C
from .backends import backend
from .cost import bytes_under
from .errors import PlanError, PlanMismatchError, PlanNotRunnableError
from .hardware import detect, gib
from .plan import Plan
from .schemes import CATALOG
from .tensors import module_bytes
from .units import units

OFF_DEVICE = ("swapped", "streamed")


# -- what identifies a pipeline ----------------------------------------------------------------
def fingerprint(pipe) -> dict:
    """What a plan's `pipeline` field holds, computed from a live pipeline (as Profile.fingerprint)."""
    return {"class": type(pipe).__name__,
            "components": {n: {"class": type(m).__name__, "params": C.n_params(m)} for n, m in C.discover(pipe).items()}}


def differences(plan: Plan, fp: dict) -> list[str]:
    want = plan.pipeline or {}
    planned = want.get("components")
    if not planned:
        return ["the plan does not record the pipeline it was made for (its 'pipeline' field has no components)"]
    diffs = []
    if want.get("class") != fp["class"]:
        diffs.append(f"the plan is for a {want.get('class', '?')}, this is a {fp['class']}")
    here = fp["components"]
    for name in planned:
        if name not in here:
            diffs.append(f"component {name!r} ({planned[name].get('class')}) is in the plan but not in this pipeline")
    for name, got in here.items():
        if name not in planned:
            diffs.append(f"component {name!r} ({got['class']}) is in this pipeline but not in the plan")
            continue
        p = planned[name]
        if p.get("class") != got["class"]:
            diffs.append(f"{name}: {p.get('class')} in the plan, {got['class']} here")
        elif p.get("params") != got["params"]:
            diffs.append(f"{name}: {p.get('params'):,} parameters in the plan, {got['params']:,} here")
        elif name not in plan.components:
            diffs.append(f"the plan has no choice for component {name!r}")
    for name in plan.components:
        if name not in here and name not in planned:
            diffs.append(f"the plan has a choice for {name!r}, which this pipeline does not have")
    return diffs


def block_differences(plan: Plan, comps: dict) -> list[str]:
    """Streamed components whose listed blocks (`Choice.streamed`) this pipeline does not have."""
    out = []
    for name, ch in plan.components.items():
        if ch.streamed is not None and name in comps:
            n = len(C.stream_blocks(comps[name]))
            if max(ch.streamed) >= n:
                out.append(f"{name}: the plan streams block {max(ch.streamed)}, this component has {n} blocks")
    return out


def check_pipeline(pipe, plan: Plan) -> None:
    """Raise PlanMismatchError unless `plan` was made for a pipeline like `pipe`."""
    diffs = differences(plan, fingerprint(pipe)) or block_differences(plan, C.discover(pipe))
    if diffs:
        raise PlanMismatchError(
            "this plan was made for another pipeline:\n  - " + "\n  - ".join(diffs) +
            "\nMake a plan for this pipeline with tierquant.plan(pipe, ...).")


# -- does the plan run here --------------------------------------------------------------------
def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PlanNotRunnableError(f"device {device} asked for, but torch sees no CUDA GPU here")
    if device.type not in ("cuda", "cpu"):
        raise PlanNotRunnableError(f"tierquant applies plans on cuda or cpu, not {device.type}")
    return device


def _instead(scheme: str, hw) -> str:
    """Schemes of the same size that do run on `hw`: dynamic ones first for a dynamic scheme."""
    s = CATALOG[scheme]
    ok = [o for o in CATALOG.values() if o.name != scheme and o.available_on(hw) is None
          and o.bytes_per_param == s.bytes_per_param]
    ok.sort(key=lambda o: (o.weight_only != s.weight_only, o.name))
    if not ok:
        return "bf16"
    dyn = [o.name for o in ok if not o.weight_only]
    wo = [o.name for o in ok if o.weight_only]
    parts = []
    if dyn:
        parts.append(" or ".join(dyn) + " (activations quantized too)")
    if wo:
        parts.append(" or ".join(wo) + " (weight-only)")
    return ", or ".join(parts) if not s.weight_only else ", or ".join(reversed(parts))


def check_runs_here(plan: Plan, device=None) -> None:
    """Raise PlanNotRunnableError (or BackendMissingError) unless every choice of `plan` runs on `device`."""
    dev = resolve_device(device)
    hw = detect(dev.type)
    where = "this CPU" if dev.type == "cpu" else f"this {hw.name} ({dev})"
    problems = []
    for name, ch in plan.components.items():
        if ch.scheme not in CATALOG:
            problems.append(f"{name}: unknown scheme {ch.scheme!r}")
            continue
        why = CATALOG[ch.scheme].available_on(hw)
        if why:
            problems.append(f"{name}: scheme {ch.scheme!r} cannot run on {where}: {why}. "
                            f"Use {_instead(ch.scheme, hw)} instead")
        if ch.placement not in ("resident", "swapped", "streamed"):
            problems.append(f"{name}: unknown placement {ch.placement!r}")
        elif ch.placement in OFF_DEVICE and dev.type != "cuda":
            problems.append(f"{name}: placement {ch.placement!r} moves weights between host and a CUDA GPU; "
                            f"on {where} every component is resident")
    if problems:
        raise PlanNotRunnableError(
            "this plan cannot be applied here:\n  - " + "\n  - ".join(problems) +
            f"\nMake a plan for this device (tierquant.plan(pipe, budget=..., target={hw.name!r})) or pin schemes "
            "that run here.")
    for scheme in sorted({ch.scheme for ch in plan.components.values()}):
        backend(scheme).require()


def estimate_bytes(module: nn.Module, scheme: str) -> int:
    """The component's weights after `scheme`, in bytes, by the planner's own rule (cost.bytes_under)."""
    layers = [lin for _, lin, why in C.quantizable_layers(module) if why is None]
    quantizable = sum(lin.weight.numel() for lin in layers)
    rows = sum(lin.out_features for lin in layers) / max(quantizable, 1)
    return bytes_under(C.n_params(module), quantizable, CATALOG[scheme], rows)


def check_fits(pipe, plan: Plan, device=None) -> None:
    """On a GPU: what apply keeps on the device, plus the largest unit in bf16, fits the plan's budget."""
    check_components_fit(C.discover(pipe), plan, device)


def on_device_bytes(module: nn.Module, ch) -> int:
    """What a component keeps on the device between its calls under choice `ch`: all of it when
    resident; for a streamed one, everything but the blocks that stream; nothing when swapped."""
    if ch.placement == "swapped":
        return 0
    whole = estimate_bytes(module, ch.scheme)
    if ch.placement == "resident":
        return whole
    blocks = [b for _, b in C.stream_blocks(module)]
    streamed = sum(C.n_params(blocks[j]) for j in ch.streamed_indices(len(blocks)))
    return int(whole * (1 - streamed / max(C.n_params(module), 1)))


def check_components_fit(comps: dict, plan: Plan, device=None) -> None:
    """check_fits for components by name: live ones, or skeletons on the meta device (no weights)."""
    dev = resolve_device(device)
    if dev.type != "cuda":
        return
    resident = sum(on_device_bytes(comps[n], ch) for n, ch in plan.components.items())
    largest = max((module_bytes(u, r, as_bf16=True) for m in comps.values() for _, u, r in units(m)), default=0)
    need = resident + largest
    free = torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_allocated(dev)
    limit = min(plan.budget_bytes, free)
    if need > limit:
        raise PlanNotRunnableError(
            f"applying this plan needs about {gib(need)} on {dev} (resident components {gib(resident)} plus the "
            f"largest block in bf16 {gib(largest)}), more than the {gib(limit)} it may use "
            f"(budget {gib(plan.budget_bytes)}). Make a plan with a smaller budget or more components off the device.")


def check(pipe, plan: Plan, device=None) -> None:
    """Everything apply checks before it changes anything. Raises a PlanError (or BackendMissingError)."""
    if getattr(pipe, "_tierquant", None) is not None:
        raise PlanError("a tierquant plan is already applied to this pipeline: apply plans to a freshly loaded one")
    check_pipeline(pipe, plan)
    check_runs_here(plan, device)
    check_fits(pipe, plan, device)
