"""Turn a Plan into a pipeline: quantize, place and compile each component as the plan says.

Order of work (docs/apply.md):
1. Check everything, change nothing: the plan is for this pipeline (classes, parameter counts), every
   scheme runs on this device, its library imports, every placement makes sense here, and the
   device can hold what the plan keeps on it.
2. Per component, unit by unit (a repeated block, or a child holding none): move the unit to the
   device in bf16 and quantize it there, so a bf16 copy of a whole component never sits on the device.
   Components that end off the device (swapped, streamed) go first and each unit goes back to the
   host once quantized: during apply the device holds the resident components plus one unit.
3. Placements: swapped components get a pinned host copy and move on their phase's first call;
   streamed components get diffusers' group offloading; resident ones stay.
4. Regional compilation where the plan asks for it.
What was quantized and what was kept (and why) is recorded in `pipe._tierquant`.
"""
from __future__ import annotations

import functools
from collections import deque
from pathlib import Path

import torch
from torch import nn

from . import components as C
from .errors import TierquantError
from .hardware import TARGETS, detect, gib
from .plan import Choice, Plan, PlanError
from .quantize import is_quantized, require_backend
from .schemes import CATALOG, apply_scheme

OFF_DEVICE = ("swapped", "streamed")


class PlanMismatchError(PlanError):
    """The plan was made for another pipeline."""


class PlanNotRunnableError(PlanError):
    """A scheme or placement of the plan cannot run on this device."""


# -- what identifies a pipeline ----------------------------------------------------------------
def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fingerprint(pipe) -> dict:
    """What a plan's `pipeline` field holds, computed from a live pipeline (as Profile.fingerprint)."""
    return {"class": type(pipe).__name__,
            "components": {n: {"class": type(m).__name__, "params": n_params(m)} for n, m in C.discover(pipe).items()}}


def _differences(plan: Plan, fp: dict) -> list[str]:
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


def check_pipeline(pipe, plan: Plan) -> None:
    """Raise PlanMismatchError unless `plan` was made for a pipeline like `pipe`."""
    diffs = _differences(plan, fingerprint(pipe))
    if diffs:
        raise PlanMismatchError(
            "this plan was made for another pipeline:\n  - " + "\n  - ".join(diffs) +
            "\nMake a plan for this pipeline with tierquant.plan(pipe, ...).")


# -- does the plan run here --------------------------------------------------------------------
def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PlanNotRunnableError(f"device {device} asked for, but torch sees no CUDA GPU here")
    if device.type not in ("cuda", "cpu"):
        raise PlanNotRunnableError(f"tierquant applies plans on cuda or cpu, not {device.type}")
    return device


def _hardware(device: torch.device):
    if device.type == "cpu":
        return TARGETS["cpu"]
    return detect()


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
    dev = _device(device)
    hw = _hardware(dev)
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
        require_backend(scheme)


# -- units: what moves to the device at once ---------------------------------------------------
def units(module: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """(qualified name, module, recurse) in order: every repeated block whole; every other submodule
    whole when it holds no block and is no bigger than the largest block (the planner's figure for
    what apply adds on the device, `components.largest_block_bytes`), else its children one by one;
    and (recurse=False) the tensors a split module owns directly."""
    found = C.blocks(module)
    block_ids = {id(b) for b in found}
    limit = max((C.param_bytes(b) for b in found), default=0) or C.largest_block_bytes(module)
    out: list[tuple[str, nn.Module, bool]] = []

    def walk(m: nn.Module, prefix: str) -> None:
        holds_block = any(id(d) in block_ids for d in m.modules())
        leaf = next(m.children(), None) is None
        if id(m) in block_ids or (not holds_block and (leaf or C.param_bytes(m) <= limit)):
            out.append((prefix, m, True))
            return
        if m._parameters or m._buffers:
            out.append((prefix, m, False))
        for child_name, child in m.named_children():
            walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    walk(module, "")
    return out


def _unit_modules(unit: nn.Module, prefix: str, recurse: bool):
    if not recurse:
        return [(prefix, unit)]
    return [(f"{prefix}.{n}" if prefix and n else (n or prefix), m) for n, m in unit.named_modules()]


def _is_plain(t: torch.Tensor) -> bool:
    return type(t) in (nn.Parameter, torch.Tensor)


def _move_tensors(owner: nn.Module, device: torch.device, dtype: torch.dtype | None, non_blocking=False) -> None:
    """Move (and cast floating plain tensors to `dtype`) the tensors `owner` holds directly."""
    for store in (owner._parameters, owner._buffers):
        for key, t in store.items():
            if t is None:
                continue
            if _is_plain(t):
                cast = dtype if (dtype is not None and t.is_floating_point()) else None
                if t.device != device or (cast is not None and t.dtype != cast):
                    t.data = t.data.to(device=device, dtype=cast, non_blocking=non_blocking)
            elif t.device != device:
                # Quantized tensor subclasses: their own .to knows their inner tensors (torchao) or
                # quantization state (bitsandbytes); `.data =` would move the wrapper only.
                moved = t.to(device, non_blocking=non_blocking)
                if isinstance(t, nn.Parameter) and not isinstance(moved, nn.Parameter):
                    moved = nn.Parameter(moved, requires_grad=False)
                store[key] = moved


def _move_unit(unit, prefix, recurse, device, non_blocking=False) -> None:
    # Everything not quantized runs in bf16, the layers a model lists in `_keep_in_fp32_modules`
    # included: that list guards against fp16 overflow (T5's wo), which bf16's range does not have;
    # transformers too loads them in bf16 when asked for bf16. They are kept out of quantization.
    for _, m in _unit_modules(unit, prefix, recurse):
        _move_tensors(m, device, torch.bfloat16, non_blocking)


def nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: a torchao tensor's inner tensors, a bitsandbytes weight's packed data
    and absmax, a plain tensor's elements."""
    if hasattr(t, "__tensor_flatten__") and not _is_plain(t):
        names, _ = t.__tensor_flatten__()
        return sum(nbytes(getattr(t, n)) for n in names)
    qs = getattr(t, "quant_state", None)
    extra = qs.absmax.numel() * qs.absmax.element_size() if getattr(qs, "absmax", None) is not None else 0
    return t.numel() * t.element_size() + extra


def _unit_bytes(unit: nn.Module, recurse: bool, bf16: bool = True) -> int:
    """Bytes of a unit's tensors: in bf16 (what moving it brings to the device), or as they are."""
    tensors = list(unit.parameters(recurse=recurse)) + list(unit.buffers(recurse=recurse))
    seen, total = set(), 0
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * 2 if bf16 and t.is_floating_point() and _is_plain(t) else nbytes(t)
    return total


def estimate_bytes(module: nn.Module, scheme: str) -> int:
    """The component's weights after `scheme`, in bytes: quantized Linear weights at the catalog's
    size, everything else in bf16."""
    s = CATALOG[scheme]
    quantized = set()
    if scheme != "bf16":
        quantized = {id(lin.weight) for _, lin, why in C.quantizable_layers(module) if why is None}
    total, seen = 0, set()
    for m in module.modules():
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            if id(t) in quantized:
                total += int(t.numel() * s.bytes_per_param)
            elif t.is_floating_point():
                total += t.numel() * 2
            else:
                total += t.numel() * t.element_size()
    return total


def check_fits(pipe, plan: Plan, device=None) -> None:
    """On a GPU: what apply keeps on the device, plus the largest unit in bf16, fits the plan's budget."""
    dev = _device(device)
    if dev.type != "cuda":
        return
    comps = C.discover(pipe)
    resident = sum(estimate_bytes(comps[n], ch.scheme) for n, ch in plan.components.items()
                   if ch.placement == "resident")
    largest = max((_unit_bytes(u, r) for m in comps.values() for _, u, r in units(m)), default=0)
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


# -- apply -------------------------------------------------------------------------------------
def apply(pipe, plan: Plan, device=None, progress: bool = True):
    """Quantize, place and compile `pipe`'s components as `plan` says; returns `pipe` (changed in place).

    Raises before changing anything when the plan is for another pipeline, a scheme or placement
    cannot run on `device` (default: the first CUDA GPU, else the CPU), or a backend is missing.
    """
    check(pipe, plan, device)
    return _apply(pipe, plan, _device(device), progress)


def _apply(pipe, plan: Plan, dev: torch.device, progress: bool, preloaded: dict | None = None):
    comps = C.discover(pipe)
    others = 0  # device bytes that are not this pipeline's: the budget guard leaves them out
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        mine = {id(t): nbytes(t) for m in comps.values()
                for t in list(m.parameters()) + list(m.buffers()) if t.device.type == "cuda"}
        others = torch.cuda.memory_allocated(dev) - sum(mine.values())
        # A pipeline that came already on the device may start above the budget: apply only shrinks it.
        limit = max(plan.budget_bytes, sum(mine.values()))
    # Off-device components first: their units leave the device once quantized.
    order = sorted(comps, key=lambda n: plan.components[n].placement == "resident")
    work = {n: units(comps[n]) for n in order}
    record: dict[str, dict] = {}
    with _progress(progress, sum(len(u) for u in work.values())) as advance:
        for name in order:
            ch = plan.components[name]
            home = dev if ch.placement == "resident" else torch.device("cpu")
            record[name] = _quantize_component(comps[name], ch.scheme, work[name], dev, home, advance,
                                               budget=limit if dev.type == "cuda" else None,
                                               others=others)
            record[name].update(scheme=ch.scheme, placement=ch.placement, compile=ch.compile)
            if preloaded and name in preloaded:
                record[name]["quantized_on_load"] = preloaded[name]

    swapped = {n for n, ch in plan.components.items() if ch.placement == "swapped"}
    for name, ch in plan.components.items():
        if ch.placement == "streamed":
            _stream(comps[name], dev)
    switcher = _PhaseSwitcher(pipe, plan, comps, swapped, dev) if swapped else None
    for name, ch in plan.components.items():
        if ch.compile:
            record[name]["compiled"] = _compile(comps[name], fullgraph=ch.placement != "streamed" and ch.scheme != "nf4")
    if dev.type == "cuda" and not any(ch.placement in ("resident", "streamed") for ch in plan.components.values()):
        _pin_execution_device(pipe, dev)

    if dev.type == "cuda":
        # Quantizing left freed bf16 blocks in the caching allocator; hand them back so the
        # generation starts from the weights alone, as the planner's peak assumes.
        torch.cuda.empty_cache()
    pipe._tierquant = {
        "device": str(dev),
        "budget_bytes": plan.budget_bytes,
        "components": record,
        "apply_peak_bytes": torch.cuda.max_memory_allocated(dev) - others if dev.type == "cuda" else None,
    }  # plain data (JSON-able), for reports
    pipe._tierquant_switcher = switcher
    return pipe


def _quantize_component(module, scheme, work, dev, home, advance, budget=None, others=0) -> dict:
    # Names only: holding the Linear modules here would keep every replaced layer's bf16 weight
    # alive (nf4 swaps modules), and the device would fill up with them.
    layers = [(n, why) for n, _, why in C.quantizable_layers(module)]
    kept = {n: why for n, why in layers if why}
    allowed = {n for n, why in layers if why is None}
    all_linears = {n for n, _ in layers}
    for prefix, unit, recurse in work:
        _move_unit(unit, prefix, recurse, dev)
        if recurse and scheme != "bf16":
            inside = {q for q, m in _unit_modules(unit, prefix, recurse) if isinstance(m, nn.Linear)}
            now = inside & allowed
            if now:
                apply_scheme(scheme, module, keep=all_linears - now)
        if home != dev:
            unit = module.get_submodule(prefix) if prefix else module  # nf4 may have replaced children
            _move_unit(unit, prefix, recurse, home)
        if budget is not None:
            used = torch.cuda.memory_allocated(dev) - others
            if used > budget:
                raise TierquantError(
                    f"applying the plan went over its budget on {dev}: {gib(used)} allocated, budget "
                    f"{gib(budget)} (at {prefix or 'the top'} of a component); the pipeline is partly changed. "
                    "Reload it and make a plan with a smaller budget.")
        advance()
    out = {"quantized": [], "kept": {}}
    if scheme != "bf16":  # (bf16: moving the units cast them, nothing else to do)
        quantized = sorted(n for n, m in module.named_modules() if is_quantized(m))
        # What a scheme left alone that it was allowed to quantize (none, normally) is kept too;
        # what a library quantized on load against our keep rules is said, not hidden.
        for n in allowed - set(quantized):
            kept.setdefault(n, "left in high precision by the quantizer")
        against = sorted(set(kept) & set(quantized))
        out = {"quantized": quantized, "kept": {n: why for n, why in kept.items() if n not in against}}
        if against:
            out["quantized_despite_keep"] = against
    out["weight_bytes"] = _unit_bytes(module, True, bf16=False)
    return out


class _progress:
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


# -- placements --------------------------------------------------------------------------------
def _stream(module: nn.Module, dev: torch.device) -> None:
    """Stream a component's blocks from the host during its calls (diffusers group offloading)."""
    # NF4 layers: group offloading swaps `param.data`, which leaves bitsandbytes' quantization state
    # behind; that state is small (one absmax per 64 weights), so it lives on the device.
    for m in module.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            qs.to(dev)
    if hasattr(module, "enable_group_offload"):  # diffusers models: one repeated block at a time
        module.enable_group_offload(onload_device=dev, offload_device=torch.device("cpu"), offload_type="block_level",
                                    num_blocks_per_group=1, use_stream=True, non_blocking=True)
    else:
        # Other models (transformers' text encoders) keep their blocks below the top level, where
        # block-level offloading does not look; leaf level with a stream prefetches layer by layer.
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(module, onload_device=dev, offload_device=torch.device("cpu"),
                               offload_type="leaf_level", use_stream=True, non_blocking=True)


class _Swapped:
    """One swapped component: a pinned host copy of each tensor, and a device copy while it is on.

    Moving replaces the tensor objects the modules hold (in every module that holds one: tied weights
    stay tied) instead of swapping `.data`: that works for torchao's tensor subclasses too, and going
    off the device needs no copy at all, since the host copy never changed.
    """

    def __init__(self, module: nn.Module, dev: torch.device):
        self.module, self.dev, self.on_device = module, dev, False
        self.slots: list[list] = []  # [host tensor, [(store, key), ...]]
        by_id: dict[int, list] = {}
        for m in module.modules():
            for store in (m._parameters, m._buffers):
                for key, t in store.items():
                    if t is None:
                        continue
                    if id(t) not in by_id:
                        by_id[id(t)] = [t, []]
                        self.slots.append(by_id[id(t)])
                    by_id[id(t)][1].append((store, key))
        for slot in self.slots:
            t = slot[0]
            if _is_plain(t) or _is_bnb(t):
                t.data = _pin(t.data)  # keeps the object (and bitsandbytes' quant_state on it)
            else:
                slot[0] = _as_param_like(t, _pin(t))
                self._put(slot, slot[0])

    @staticmethod
    def _put(slot, t) -> None:
        for store, key in slot[1]:
            store[key] = t

    def onload(self) -> None:
        if self.on_device:
            return
        for slot in self.slots:
            host = slot[0]
            # Params4bit.to also moves its quant_state, in place.
            self._put(slot, _as_param_like(host, host.to(self.dev, non_blocking=True)))
        self.on_device = True

    def offload(self) -> None:
        if not self.on_device:
            return
        for slot in self.slots:
            host = slot[0]
            self._put(slot, host)
            if _is_bnb(host) and host.quant_state is not None:
                host.quant_state.to("cpu")  # shared with the device copy, which moved it
        self.on_device = False


def _is_bnb(t) -> bool:
    return type(t).__name__ == "Params4bit"


def _as_param_like(like: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if isinstance(like, nn.Parameter) and not isinstance(t, nn.Parameter):
        return nn.Parameter(t, requires_grad=False)
    return t


def _pin(t: torch.Tensor) -> torch.Tensor:
    """A pinned copy of a host tensor where pinning is possible (CUDA present, tensor type supports it)."""
    t = t.to("cpu")
    if not torch.cuda.is_available():
        return t
    try:
        return t if t.is_pinned() else t.pin_memory()
    except (RuntimeError, NotImplementedError, TypeError):
        return t  # torchao tensor types without pin_memory: pageable copies, slower but correct


class _PhaseSwitcher:
    """Moves swapped components on when their phase starts and off when another phase starts.

    A phase starts when any of its components' entry points (forward, decode, ...) is called.
    """

    def __init__(self, pipe, plan: Plan, comps: dict, swapped: set, dev: torch.device):
        self.phase_of: dict[str, int] = {}
        for i, ph in enumerate(plan.phases or []):
            for n in ph.get("components", []):
                self.phase_of.setdefault(n, i)
        extra = len(plan.phases or [])
        for n in comps:
            if n not in self.phase_of:
                self.phase_of[n] = extra
                extra += 1
        self.swapped = {n: _Swapped(comps[n], dev) for n in comps if n in swapped}
        self.current: int | None = None
        self.calls: deque[str] = deque(maxlen=64)  # the latest phase switches, for tests and reports
        for name, module in comps.items():
            self._hook(name, module)

    @torch.compiler.disable  # moves tensors: never traced into a compiled region
    def enter(self, name: str) -> None:
        phase = self.phase_of[name]
        if phase == self.current:
            return
        # Free the device before filling it: the other phase's components go first.
        for n, sw in self.swapped.items():
            if self.phase_of[n] != phase:
                sw.offload()
        for n, sw in self.swapped.items():
            if self.phase_of[n] == phase:
                sw.onload()
        self.current = phase
        self.calls.append(name)

    def _hook(self, name: str, module: nn.Module) -> None:
        # forward: a pre-hook, so the phase switch happens before any offloading hook inside forward.
        module.register_forward_pre_hook(lambda m, args, _n=name: self.enter(_n))
        for method in C.entry_points(module):
            if method == "forward":
                continue
            fn = getattr(module, method, None)
            if not callable(fn):
                continue
            setattr(module, method, _entered(self, name, fn))


def _entered(switcher: _PhaseSwitcher, name: str, fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        switcher.enter(name)
        return fn(*args, **kwargs)

    return call


def _pin_execution_device(pipe, dev: torch.device) -> None:
    # With every component off the device between its calls, diffusers would infer "cpu" as the
    # execution device and make latents there. A subclass of the pipeline's own class says where.
    cls = type(pipe)
    pipe.__class__ = type(cls.__name__, (cls,), {"_execution_device": property(lambda self: dev),
                                                 "__module__": cls.__module__})


# -- regional compilation ----------------------------------------------------------------------
def _compile(module: nn.Module, fullgraph: bool) -> list[str]:
    """Compile the repeated blocks of `module`; returns their class names."""
    if getattr(module, "_repeated_blocks", None) and hasattr(module, "compile_repeated_blocks"):
        module.compile_repeated_blocks(fullgraph=fullgraph)
        return list(module._repeated_blocks)
    found = _outermost(C.blocks(module))
    if not found:
        module.compile()
        return [type(module).__name__]
    for b in found:
        b.compile()  # not fullgraph: other libraries' blocks are not written for it
    return sorted({type(b).__name__ for b in found})


def _outermost(blocks: list[nn.Module]) -> list[nn.Module]:
    inner = {id(d) for b in blocks for d in b.modules() if d is not b}
    return [b for b in blocks if id(b) not in inner]


# -- load and save -----------------------------------------------------------------------------
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token")


def load(path_or_repo_id, plan: Plan, device=None, progress: bool = True, **from_pretrained_kwargs):
    """Load a pipeline checkpoint quantizing while loading where the libraries can, then place and
    compile it as `apply` does. Checks the plan against the checkpoint's configs before reading weights.

    Quantization on load: torchao schemes through diffusers' and transformers' TorchAoConfig; nf4
    through BitsAndBytesConfig for resident components on a GPU (bitsandbytes' loaders refuse a
    CPU-only machine, and they would load a swapped or streamed component whole onto the GPU).
    Every other component loads in bf16 and is quantized unit by unit on the device, as in `apply`.
    """
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig

    dev = _device(device)
    check_runs_here(plan, dev)
    hub = {k: from_pretrained_kwargs[k] for k in _HUB_KWARGS if k in from_pretrained_kwargs}
    skeletons, libs, fp = _skeletons(DiffusionPipeline, path_or_repo_id, hub)
    diffs = _differences(plan, fp)
    if diffs:
        raise PlanMismatchError(
            f"this plan was made for another pipeline than {path_or_repo_id}:\n  - " + "\n  - ".join(diffs) +
            "\nMake a plan for this pipeline with tierquant.plan(pipe, ...).")
    mapping, preloaded = {}, {}
    for name, ch in plan.components.items():
        keep = sorted(n for n, _, why in C.quantizable_layers(skeletons[name]) if why)
        cfg = _on_load_config(ch, libs[name], keep, dev)
        if cfg is not None:
            mapping[name] = cfg
            preloaded[name] = type(cfg).__module__.split(".")[0] + "." + type(cfg).__name__
    kwargs = dict(from_pretrained_kwargs)
    if "torch_dtype" not in kwargs:  # diffusers 0.42 calls it `dtype` (torch_dtype is deprecated)
        kwargs.setdefault("dtype", torch.bfloat16)
    if mapping:
        kwargs["quantization_config"] = PipelineQuantizationConfig(quant_mapping=mapping)
    pipe = DiffusionPipeline.from_pretrained(path_or_repo_id, **kwargs)
    check_fits(pipe, plan, dev)
    return _apply(pipe, plan, dev, progress, preloaded=preloaded)


def _skeletons(DiffusionPipeline, path, hub: dict):
    """Each torch component of a checkpoint built on the meta device from its config (no weights
    read), its library, and the pipeline's fingerprint."""
    import importlib

    from accelerate import init_empty_weights

    index = DiffusionPipeline.load_config(path, **hub)
    skeletons, libs, comps = {}, {}, {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, (list, tuple)) or len(spec) != 2 or spec[0] is None:
            continue
        lib, cls_name = spec
        try:
            cls = getattr(importlib.import_module(lib), cls_name)
        except (ImportError, AttributeError):
            continue
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            continue
        with init_empty_weights(include_buffers=False):
            if hasattr(cls, "load_config") and hasattr(cls, "from_config"):  # diffusers models
                module = cls.from_config(cls.load_config(path, subfolder=name, **hub))
            else:  # transformers models
                module = cls(cls.config_class.from_pretrained(path, subfolder=name, **hub))
        if hasattr(module, "tie_weights"):  # as from_pretrained does (T5's shared embedding); not
            module.tie_weights()  # inside init_empty_weights, where it does nothing
        skeletons[name], libs[name] = module, lib
        comps[name] = {"class": cls_name, "params": n_params(module)}
    return skeletons, libs, {"class": index.get("_class_name"), "components": comps}


def _on_load_config(ch: Choice, lib: str, keep: list[str], dev: torch.device):
    """The library's quantization config that does `ch.scheme` while loading, or None."""
    backend = CATALOG[ch.scheme].backend
    if backend == "torchao":
        from .quantize import torchao_config

        if lib == "diffusers":
            from diffusers import TorchAoConfig
        elif lib == "transformers":
            from transformers import TorchAoConfig
        else:
            return None
        # Full module names: diffusers matches "name." inside parameter names, transformers matches from
        # the start of the name (a bare "wo" would not keep T5's wo layers).
        return TorchAoConfig(torchao_config(ch.scheme), modules_to_not_convert=keep)
    if backend == "bitsandbytes" and dev.type == "cuda" and ch.placement == "resident":
        if lib == "diffusers":
            from diffusers import BitsAndBytesConfig
        elif lib == "transformers":
            from transformers import BitsAndBytesConfig
        else:
            return None
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                  bnb_4bit_use_double_quant=False, llm_int8_skip_modules=keep)
    return None


def _quant_config(scheme: str, lib: str, keep: list[str]):
    """The library config describing `scheme` (what a checkpoint's config.json records)."""
    ch = Choice(scheme, "resident", False)
    return _on_load_config(ch, lib, keep, torch.device("cuda"))


def _library(module: nn.Module) -> str:
    return type(module).__module__.split(".")[0]


# Schemes whose quantized tensors a checkpoint can hold: torchao tensors (diffusers writes them with
# torch.save, transformers flattens them into safetensors) and bitsandbytes NF4 (its own state-dict
# format; loading it back needs a CUDA GPU: bitsandbytes' loaders refuse a CPU-only machine).
SERIALIZABLE = ("bf16", "fp8-dynamic", "fp8-weight", "int8-weight", "int8-dynamic", "nf4")


def save_applied(pipe, path) -> Path:
    """Save an applied pipeline so that `DiffusionPipeline.from_pretrained(path)` (or
    `tierquant.load(path, plan)`) loads it back quantized, without the bf16 weights.

    Components quantized after loading get the library's quantization config recorded in their
    config.json, as if they had been quantized on load. Placements and compilation are not saved:
    they are the plan's business at load time. Also writes tierquant.json: what was quantized and kept.
    """
    import json

    state = getattr(pipe, "_tierquant", None)
    if state is None:
        raise PlanError("this pipeline has no tierquant plan applied: apply one (tierquant.apply) before save_applied")
    comps = C.discover(pipe)
    bad = [f"{n} ({r['scheme']})" for n, r in state["components"].items() if r["scheme"] not in SERIALIZABLE]
    if bad:
        raise PlanError(f"cannot save {', '.join(bad)}: these schemes do not serialize (docs/apply.md)")
    path = Path(path)
    attached = []
    try:
        for name, rec in state["components"].items():
            module = comps[name]
            if rec["scheme"] == "bf16" or getattr(module, "hf_quantizer", None) is not None:
                continue
            attached.append(_attach_quantizer(module, _quant_config(rec["scheme"], _library(module), sorted(rec["kept"]))))
        # diffusers models holding torchao tensors can only be written with torch.save
        pipe.save_pretrained(path, safe_serialization=False)
    finally:
        for undo in attached:
            undo()
    record = {n: {k: v for k, v in r.items() if k in ("scheme", "quantized", "kept", "quantized_on_load")}
              for n, r in state["components"].items()}
    (path / "tierquant.json").write_text(json.dumps({"components": record}, indent=1) + "\n")
    return path


def _attach_quantizer(module: nn.Module, cfg):
    """Make a model quantized after loading look quantized-on-load to its library's save_pretrained;
    returns a function that takes it back."""
    if _library(module) == "diffusers":
        from diffusers.quantizers import DiffusersAutoQuantizer

        quantizer = DiffusersAutoQuantizer.from_config(cfg, pre_quantized=True)
        quantizer.offload = False  # set while loading (validate_environment); nothing is offloaded to disk
        before = module.config.get("quantization_config")
        module.register_to_config(quantization_config=cfg)

        def undo():
            module.hf_quantizer = None
            module.register_to_config(quantization_config=before)
            if before is None:
                d = dict(module._internal_dict)
                d.pop("quantization_config", None)
                from diffusers.configuration_utils import FrozenDict

                module._internal_dict = FrozenDict(d)
    else:
        from transformers.quantizers.auto import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(cfg, pre_quantized=True)
        had = hasattr(module.config, "quantization_config")
        before = getattr(module.config, "quantization_config", None)
        module.config.quantization_config = cfg

        def undo():
            module.hf_quantizer = None
            if had:
                module.config.quantization_config = before
            else:
                del module.config.quantization_config
    module.hf_quantizer = quantizer
    return undo
