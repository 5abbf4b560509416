"""Applying a plan over several cards (`Plan.devices`).

- Components across cards: every component is quantized and placed on its own card (`device_map`),
  within that card's budget. The pipeline computes on the denoiser's card (its `_execution_device`);
  a hook on each component elsewhere moves its tensor inputs to its card before each call and its
  tensor outputs back after it, and diffusers is told where each component computes
  (`placement.mark_execution_device`), as for swapped components.
- Context parallelism (`Plan.parallel`): one process per card, started by `tierquant run --devices`
  (`launch.py`) or torchrun. In each, the plan's single-card view (`Plan.rank_plan`) is applied on that
  process's card, then diffusers' own `enable_parallelism(config=ContextParallelConfig(...))` splits the
  component's sequence over the processes. No collective code of ours.

Check everything, change nothing: every card the plan names must exist, and each card's share must
run there and fit its budget, before a single tensor moves.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from . import components as C
from .applier import BudgetGuard, Progress, quantize_component, quantize_order, tensors_of
from .checks import check_components_fit, check_pipeline, check_runs_here
from .compilation import compile_regions
from .errors import PlanError, PlanNotRunnableError
from .hooks import Hook, add_hook, remove_hook
from .parallel import config_kwargs
from .placement import PhaseSwitcher, mark_execution_device, note_unpinned, pin_execution_device
from .plan import Plan
from .schemes import CATALOG
from .streaming import BlockStreamer
from .units import units

HOOK = "tierquant.devices"


def device_map(plan: Plan) -> dict[str, str]:
    """Where each component computes: {"text_encoder_2": "cuda:1", ...}. For a context-parallel plan,
    each process's own card holds every component ("cuda" of that process)."""
    if plan.parallel:
        return {n: "cuda" for n in plan.components}
    return {n: f"cuda:{c.device}" for n, c in plan.components.items()}


def home_card(plan: Plan) -> int:
    """The card the pipeline computes on: the one of the component taking the most time."""
    return max(plan.components.values(), key=lambda c: c.predicted_seconds).device


def card_plan(plan: Plan, d: int) -> Plan:
    """The part of `plan` on card `d`, as a one-card plan within that card's budget."""
    dev = plan.devices[d]
    return replace(plan, components={n: c for n, c in plan.components.items() if c.device == d},
                   budget_bytes=dev["budget_bytes"], hardware=dev["hardware"], devices=[], parallel=None)


def check_cards(plan: Plan) -> None:
    """Every card the plan places a component on exists here."""
    used = sorted({c.device for c in plan.components.values()})
    if plan.parallel:
        return check_processes(plan)
    if not torch.cuda.is_available():
        raise PlanNotRunnableError(
            f"this plan places components on {len(plan.devices)} CUDA GPUs (cards {', '.join(map(str, used))}), "
            "but torch sees no CUDA GPU here. Make a plan for this device: one --budget (tierquant.plan(pipe, "
            "budget='...')), without a list of budgets")
    have = torch.cuda.device_count()
    missing = [d for d in used if d >= have]
    if missing:
        names = [n for n, c in plan.components.items() if c.device in missing]
        raise PlanNotRunnableError(
            f"this plan places {', '.join(names)} on {', '.join(f'cuda:{d}' for d in missing)}, but torch sees "
            f"{have} CUDA GPU(s) here (CUDA_VISIBLE_DEVICES?). Make a plan with {have} budget(s), or run where "
            f"there are {max(used) + 1} GPUs")


def check_processes(plan: Plan) -> None:
    """A context-parallel plan runs in one process per card, the processes joined by torch.distributed."""
    par = plan.parallel
    how = (f"run it with `tierquant run PLAN --devices {','.join(map(str, range(par['degree'])))}` (one process per "
           f"card), or under torchrun --nproc-per-node {par['degree']} after torch.distributed.init_process_group")
    if not torch.cuda.is_available():
        raise PlanNotRunnableError(f"this plan runs {par['component']} context-parallel over {par['degree']} CUDA "
                                   f"GPUs, but torch sees no CUDA GPU here; {how}")
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise PlanNotRunnableError(f"this plan runs {par['component']} context-parallel over {par['degree']} cards, "
                                   f"which needs one process per card: {how}")
    if dist.get_world_size() != par["degree"]:
        raise PlanNotRunnableError(f"this plan runs {par['component']} over {par['degree']} cards, but "
                                   f"{dist.get_world_size()} processes were started: {how}")


def check(pipe, plan: Plan) -> None:
    """Everything `apply` checks before it changes anything."""
    if getattr(pipe, "_tierquant", None) is not None:
        raise PlanError("a tierquant plan is already applied to this pipeline: apply plans to a freshly loaded one")
    check_pipeline(pipe, plan)
    check_cards(plan)
    if plan.parallel:
        return
    comps = C.discover(pipe)
    for d in sorted({c.device for c in plan.components.values()}):
        part = card_plan(plan, d)
        dev = torch.device("cuda", d)
        check_runs_here(part, dev)
        check_components_fit({n: comps[n] for n in part.components}, part, dev)


def is_multi(plan: Plan) -> bool:
    return bool(plan.parallel) or len(plan.devices) > 1


def apply_plan(pipe, plan: Plan, device=None, progress: bool = True):
    """`applier.apply`, or `apply` for a plan over several cards."""
    if is_multi(plan):
        return apply(pipe, plan, device, progress)
    from .applier import apply as apply_one

    return apply_one(pipe, plan, device=device, progress=progress)


def load_plan(path_or_repo_id, plan: Plan, device=None, progress: bool = True, **from_pretrained_kwargs):
    """`checkpoint.load`, also for plans over several cards: a context-parallel plan's single-card view
    loads on this process's card, quantizing while loading, then parallelism is enabled; a plan with
    components across cards loads the pipeline in bf16 on the host first (all of it: more host memory
    than `checkpoint.load` needs), then applies."""
    from .checkpoint import load as load_one

    if plan.parallel:
        check_processes(plan)
        import torch.distributed as dist

        dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        pipe = load_one(path_or_repo_id, plan.rank_plan(), device=dev,
                        progress=progress and dist.get_rank() == 0, **from_pretrained_kwargs)
        enable_parallelism(pipe, plan)
        pipe._tierquant["parallel"] = dict(plan.parallel, rank=dist.get_rank())
        return pipe
    if not is_multi(plan):
        return load_one(path_or_repo_id, plan, device=device, progress=progress, **from_pretrained_kwargs)
    check_cards(plan)
    from diffusers import DiffusionPipeline

    kwargs = {"torch_dtype": torch.bfloat16, **from_pretrained_kwargs}
    return apply(DiffusionPipeline.from_pretrained(path_or_repo_id, **kwargs), plan, progress=progress)


def apply(pipe, plan: Plan, device=None, progress: bool = True):
    """Apply a plan over several cards (see the module's docstring); returns `pipe`, changed in place."""
    check(pipe, plan)
    if plan.parallel:
        return _apply_parallel(pipe, plan, device, progress)
    comps = C.discover(pipe)
    devs = {n: torch.device("cuda", c.device) for n, c in plan.components.items()}
    guards = {d: BudgetGuard(torch.device("cuda", d), plan.devices[d]["budget_bytes"],
                             [t for n, m in comps.items() if devs[n].index == d for t in tensors_of(m)])
              for d in {v.index for v in devs.values()}}
    work = {n: units(comps[n]) for n in quantize_order(plan, comps)}
    with Progress(progress, sum(len(u) for u in work.values())) as advance:
        record = {n: quantize_component(comps[n], plan.components[n], devs[n], guards[devs[n].index], advance, work[n])
                  for n in work}
    home = torch.device("cuda", home_card(plan))
    streamers = {n: BlockStreamer(comps[n], devs[n], ch.resident_blocks, ch.prefetch, ch.streamed)
                 for n, ch in plan.components.items() if ch.placement == "streamed"}
    swapped = {n for n, ch in plan.components.items() if ch.placement == "swapped"}
    switcher = PhaseSwitcher(pipe, plan, comps, swapped, devs, streamers=streamers) if swapped or streamers else None
    note_unpinned(record, streamers, switcher)
    for n, ch in plan.components.items():
        if ch.compile:
            record[n]["compiled"] = compile_regions(comps[n], fullgraph=CATALOG[ch.scheme].composes_with_compile,
                                                    hooks_outside=n in streamers)
        if devs[n] != home:
            mark_execution_device(comps[n], devs[n])
            add_hook(comps[n], HOOK, ToCard(devs[n], home), C.entry_points(comps[n]))
            record[n]["device"] = str(devs[n])
    pin_execution_device(pipe, home)
    for d in guards:
        with torch.cuda.device(d):
            torch.cuda.empty_cache()
    peaks = [g.peak() for g in guards.values() if g.peak() is not None]
    pipe._tierquant = {"device": str(home), "devices": {n: str(v) for n, v in devs.items()},
                       "budget_bytes": plan.devices[home.index]["budget_bytes"], "components": record,
                       "apply_peak_bytes": max(peaks) if peaks else None}
    pipe._tierquant_switcher = switcher
    pipe._tierquant_streamers = streamers
    return pipe


def _apply_parallel(pipe, plan: Plan, device, progress: bool):
    import torch.distributed as dist

    from .applier import apply as apply_one

    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    apply_one(pipe, plan.rank_plan(), device=dev, progress=progress and dist.get_rank() == 0)
    enable_parallelism(pipe, plan)
    pipe._tierquant["parallel"] = dict(plan.parallel, rank=dist.get_rank())
    return pipe


def enable_parallelism(pipe, plan: Plan) -> None:
    """diffusers' own context parallelism on the plan's component, in this process."""
    par = plan.parallel
    module = C.discover(pipe)[par["component"]]
    if not callable(getattr(module, "enable_parallelism", None)):
        raise PlanNotRunnableError(f"{par['component']} ({type(module).__name__}) has no enable_parallelism: this "
                                   f"diffusers cannot run it context-parallel. Make a plan without parallelism "
                                   f"(one budget, or tierquant.devices.plan_devices(..., parallel=False))")
    from diffusers import ContextParallelConfig

    module.enable_parallelism(config=ContextParallelConfig(**config_kwargs(par)))


def remove(pipe) -> None:
    """Take the card hooks off (for tests and reports: the components stay where they are)."""
    for m in C.discover(pipe).values():
        remove_hook(m, HOOK)


def to_device(x, dev: torch.device):
    """`x` with every tensor in it (tuples, lists, dicts, diffusers' and transformers' outputs) on `dev`."""
    if isinstance(x, torch.Tensor):
        return x.to(dev, non_blocking=True) if x.device != dev else x
    if isinstance(x, dict):  # BaseOutput and ModelOutput are dicts whose items are their fields
        for k in list(x.keys()):
            x[k] = to_device(x[k], dev)
        return x
    if isinstance(x, (list, tuple)):
        moved = [to_device(v, dev) for v in x]
        return type(x)(moved) if type(x) in (list, tuple) else x if all(a is b for a, b in zip(moved, x)) \
            else type(x)(*moved)
    return x


class ToCard(Hook):
    """A component on another card than the pipeline's: its inputs go there, its outputs come back."""

    def __init__(self, dev: torch.device, home: torch.device):
        self.dev, self.home = dev, home

    @torch.compiler.disable
    def pre_call(self, obj, method, args, kwargs):
        return to_device(tuple(args), self.dev), to_device(dict(kwargs), self.dev)

    @torch.compiler.disable
    def post_call(self, obj, method, output):
        return to_device(output, self.home)
