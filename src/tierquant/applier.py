"""Turn a Plan into a pipeline: quantize, place and compile each component as the plan says.

Order of work (docs/apply.md):
1. `checks.check`: everything checked, nothing changed.
2. Per component, unit by unit (`units.py`): move the unit to the device in bf16 and quantize it
   there, so a bf16 copy of a whole component never sits on the device. Components that end off
   the device (swapped, streamed) go first and each unit goes back to the host once quantized:
   during apply the device holds the resident components plus one unit. A guard raises if this
   pipeline's allocation on the device ever exceeds the budget.
3. Placements (`placement.py`), then regional compilation (`compilation.py`) where the plan asks.
What was quantized and what was kept (and why) is recorded in `pipe._tierquant`.
"""
from __future__ import annotations

import torch
from torch import nn

from . import components as C
from .activations import enable_tiling
from .backends import backend, is_quantized, quantize
from .checks import check, resolve_device
from .compilation import compile_regions
from .errors import TierquantError
from .hardware import gib
from .placement import PhaseSwitcher, note_unpinned, pin_execution_device
from .streaming import BlockStreamer
from .plan import Plan
from .schemes import CATALOG
from .tensors import module_bytes, nbytes
from .units import move_unit, unit_modules, units


# -- apply -------------------------------------------------------------------------------------
def apply(pipe, plan: Plan, device=None, progress: bool = True):
    """Quantize, place and compile `pipe`'s components as `plan` says; returns `pipe` (changed in place).

    Raises before changing anything when the plan is for another pipeline, a scheme or placement
    cannot run on `device` (default: the first CUDA GPU, else the CPU), or a backend is missing.
    """
    check(pipe, plan, device)
    return apply_checked(pipe, plan, resolve_device(device), progress)


def apply_checked(pipe, plan: Plan, dev: torch.device, progress: bool):
    """`apply` after `checks.check` has passed."""
    comps = C.discover(pipe)
    guard = BudgetGuard(dev, plan.budget_bytes, [t for m in comps.values() for t in tensors_of(m)])
    work = {n: units(comps[n]) for n in quantize_order(plan, comps)}
    with Progress(progress, sum(len(u) for u in work.values())) as advance:
        record = {n: quantize_component(comps[n], plan.components[n], dev, guard, advance, work[n]) for n in work}
    return finish(pipe, plan, record, dev, guard)


def quantize_order(plan: Plan, names) -> list[str]:
    """Off-device components first: their units leave the device once quantized, so the device
    never holds more than the resident components plus one unit."""
    return sorted(names, key=lambda n: plan.components[n].placement == "resident")


def tensors_of(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


class BudgetGuard:
    """Raises as soon as this pipeline's bytes on the device exceed the budget while applying.
    Bytes that were on the device before and are not this pipeline's are left out."""

    def __init__(self, dev: torch.device, budget: int, ours: list[torch.Tensor] = ()):
        self.dev, self.limit, self.others = dev, None, 0
        if dev.type != "cuda":
            return
        torch.cuda.reset_peak_memory_stats(dev)
        mine = sum({id(t): nbytes(t) for t in ours if t.device.type == "cuda"}.values())
        self.others = torch.cuda.memory_allocated(dev) - mine
        # A pipeline that came already on the device may start above the budget: apply only shrinks it.
        self.limit = max(budget, mine)

    def check(self, where: str) -> None:
        if self.limit is None:
            return
        used = torch.cuda.memory_allocated(self.dev) - self.others
        if used > self.limit:
            raise TierquantError(
                f"applying the plan went over its budget on {self.dev}: {gib(used)} allocated, budget "
                f"{gib(self.limit)} (at {where}); the pipeline is partly changed. "
                "Reload it and make a plan with a smaller budget.")

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.dev) - self.others if self.dev.type == "cuda" else None


def quantize_component(module: nn.Module, ch, dev: torch.device, guard: BudgetGuard, advance,
                       work=None) -> dict:
    """Quantize one component unit by unit on `dev` and leave it where its placement wants it
    (the device if resident, else the host). Returns what was quantized and kept, and why."""
    host = torch.device("cpu")
    if ch.placement == "streamed":
        # The blocks that stream wait on the host; the resident blocks and everything outside the
        # blocks stay on the device.
        blocks = [n for n, _ in C.stream_blocks(module)]
        names = [blocks[j] for j in ch.streamed_indices(len(blocks))]

        def home(prefix: str) -> torch.device:
            return host if any(prefix == n or prefix.startswith(n + ".") for n in names) else dev
    else:
        def home(prefix: str) -> torch.device:
            return dev if ch.placement == "resident" else host
    out = _quantize(module, ch.scheme, work if work is not None else units(module), dev, home, guard, advance)
    out.update(scheme=ch.scheme, placement=ch.placement, compile=ch.compile)
    return out


def finish(pipe, plan: Plan, record: dict, dev: torch.device, guard: BudgetGuard):
    """Placements and compilation, once every component is quantized; records `pipe._tierquant`."""
    comps = C.discover(pipe)
    swapped = {n for n, ch in plan.components.items() if ch.placement == "swapped"}
    streamers = {n: BlockStreamer(comps[n], dev, ch.resident_blocks, ch.prefetch, ch.streamed)
                 for n, ch in plan.components.items() if ch.placement == "streamed"}
    free = plan.free_between_phases and dev.type == "cuda"
    switcher = (PhaseSwitcher(pipe, plan, comps, swapped, dev, free_cache=free, streamers=streamers)
                if swapped or free or streamers else None)
    note_unpinned(record, streamers, switcher)
    for name, ch in plan.components.items():
        if ch.tiled:
            enable_tiling(comps[name])
            record[name]["tiled"] = True
    for name, ch in plan.components.items():
        if ch.compile:
            # fullgraph where the library traces whole (not NF4). A streamed component's blocks are
            # compiled through `forward`, so the streaming hooks around each block stay outside.
            record[name]["compiled"] = compile_regions(comps[name], fullgraph=CATALOG[ch.scheme].composes_with_compile,
                                                       hooks_outside=name in streamers)
    if dev.type == "cuda" and any(ch.placement != "resident" for ch in plan.components.values()):
        # diffusers infers where to compute from its first component, which may be one that waits on
        # the host (a swapped VAE: latents were then made on the CPU; tiny Flux on an H100, 2026-11-26).
        pin_execution_device(pipe, dev)

    if dev.type == "cuda":
        # Quantizing left freed bf16 blocks in the caching allocator; hand them back so the
        # generation starts from the weights alone, as the planner's peak assumes.
        torch.cuda.empty_cache()
    pipe._tierquant = {
        "device": str(dev),
        "budget_bytes": plan.budget_bytes,
        "components": record,
        "apply_peak_bytes": guard.peak(),
    }  # plain data (JSON-able), for reports
    pipe._tierquant_switcher = switcher
    pipe._tierquant_streamers = streamers
    return pipe


def _quantize(module, scheme, work, dev, home, guard: BudgetGuard, advance) -> dict:
    # home(prefix): where the unit at `prefix` lives once quantized.
    # Names only: holding the Linear modules here would keep every replaced layer's bf16 weight
    # alive (nf4 swaps modules), and the device would fill up with them.
    layers = [(n, why) for n, _, why in C.quantizable_layers(module)]
    kept = {n: why for n, why in layers if why}
    allowed = {n for n, why in layers if why is None}
    all_linears = {n for n, _ in layers}
    for prefix, unit, recurse in work:
        move_unit(unit, prefix, recurse, dev)
        if recurse and scheme != "bf16":
            inside = {q for q, m in unit_modules(unit, prefix, recurse) if isinstance(m, nn.Linear)}
            now = inside & allowed
            if now:
                quantize(module, scheme, keep=all_linears - now)
        if home(prefix) != dev:
            unit = module.get_submodule(prefix) if prefix else module  # nf4 may have replaced children
            move_unit(unit, prefix, recurse, home(prefix))
        guard.check(f"{prefix or 'the top'} of a component")
        advance()
    out = {"quantized": [], "kept": {}}
    if scheme != "bf16":  # (bf16: moving the units cast them, nothing else to do)
        quantized = sorted(n for n, m in module.named_modules() if is_quantized(m))
        # What a scheme left alone that it was allowed to quantize (none, normally) is kept too;
        # what a library quantized on load against our keep rules is said, not hidden.
        for n in allowed - set(quantized):
            kept.setdefault(n, backend(scheme).can_quantize(module.get_submodule(n))
                            or "left in high precision by the quantizer")
        against = sorted(set(kept) & set(quantized))
        out = {"quantized": quantized, "kept": {n: why for n, why in kept.items() if n not in against}}
        if against:
            out["quantized_despite_keep"] = against
    out["weight_bytes"] = module_bytes(module)
    return out


class Progress:
    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import Progress

        self.bar = Progress(console=Console(stderr=True), transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("quantizing", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False
