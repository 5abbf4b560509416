"""Profiling a pipeline: run it once with hooks on its components and record what each call costs.

Hooks go on the component *instances* (their entry points: forward, decode, encode, ...) and on
their Linear layers, and come off afterwards, even on error. Only the outermost call into a
component counts (vae.forward calling vae.decode is one call).

The first call of each entry point is instrumented: FLOPs (FlopCounterMode), rows through every
Linear, and on CPU and meta the activation peak (a dispatch mode that tracks the storages the
call creates). Later calls are only timed. On CUDA the first call is run a second time,
uninstrumented, for its peak (CUDA memory stats) and a clean timing (it is the warm-up too).
"""
from __future__ import annotations

import inspect
import json
import math
import statistics
import time
from collections import Counter, defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten

from . import components as C
from .errors import TierquantError
from .hardware import device_label
from .counting import LiveBytes, flop_counter
from .hooks import Hook, add_hook, remove_hook
from .activations import tiling_facts
from .profile import ComponentProfile, Layer, Profile, phases_from_calls

# Show a progress bar over the denoising steps once a run has taken this long.
PROGRESS_AFTER_S = 3.0


# -- per-component bookkeeping ---------------------------------------------------------------

@dataclass
class _Counted:
    """What the instrumented call of one entry point measured."""

    flops: float = 0.0
    linear_flops: float = 0.0
    peak: int = 0
    rows: dict[str, float] = field(default_factory=dict)
    block_flops: list[list[float]] = field(default_factory=list)  # [FLOPs, Linear FLOPs] per stream block


@contextmanager
def _block_flops(module: torch.nn.Module, counter):
    """{stream block name: the FLOPs its calls counted}, filled while inside: the counter's total read
    at each call's start and end (stream blocks do not nest, and the counter's own names for modules
    depend on which entry point was called)."""
    found: dict[str, float] = {}
    handles = []
    for name, block in C.stream_blocks(module):
        found[name] = 0.0
        start: list[float] = []
        handles.append(block.register_forward_pre_hook(
            lambda m, args, _s=start: _s.append(counter.get_total_flops())))
        handles.append(block.register_forward_hook(
            lambda m, args, out, _s=start, _n=name: found.__setitem__(_n, found[_n] + counter.get_total_flops() - _s.pop())))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


@dataclass
class _Component:
    name: str
    module: torch.nn.Module
    methods: Counter = field(default_factory=Counter)
    counted: dict[str, _Counted] = field(default_factory=dict)
    clean_seconds: dict[str, list] = field(default_factory=lambda: defaultdict(list))  # uninstrumented
    counted_seconds: dict[str, float] = field(default_factory=dict)
    steps_at_call: list[int] = field(default_factory=list)  # denoising steps done before each call
    shapes_out: dict[str, tuple] = field(default_factory=dict)  # shim runs: method -> (input signature, output)
    active: bool = False  # inside an outermost call (re-entrancy guard)
    counting: dict[str, float] | None = None  # rows per Linear while an instrumented call runs


@dataclass
class Shim:
    """How to run components somewhere other than where the pipeline's glue runs (see builtin.py).

    `inputs` maps (args, kwargs) to what the real module gets; `outputs` maps its result back to
    what the pipeline sees. `device` names where components really run ("meta").
    """

    inputs: Callable[[tuple, dict], tuple[tuple, dict]]
    outputs: Callable[[Any], Any]
    device: str = "meta"
    # Workspace a real device's kernels would hold during an op (see LiveBytes).
    transient: Callable[[Any, tuple, Any], int] | None = None


class _Timer:
    def __init__(self, device: torch.device | None):
        self.cuda = device is not None and device.type == "cuda"

    @contextmanager
    def __call__(self, sink: Callable[[float], None]):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            end.synchronize()
            sink(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            yield
            sink(time.perf_counter() - t)


HOOK = "tierquant.profiler"


class _CallHook(Hook):
    """Counts and times the outermost call into a component (vae.forward calling vae.decode is one)."""

    def __init__(self, recorder: "Recorder", comp: _Component):
        self.recorder, self.comp = recorder, comp

    def around(self, call, obj, method, args, kwargs):
        if self.comp.active:
            return call(*args, **kwargs)
        self.comp.active = True
        try:
            return self.recorder._call(self.comp, method, call, args, kwargs)
        finally:
            self.comp.active = False


class _StepHook(Hook):
    """The scheduler's `step` marks the denoising step boundaries."""

    def __init__(self, recorder: "Recorder"):
        self.recorder = recorder

    def post_call(self, obj, method, output):
        self.recorder.steps_done += 1
        self.recorder._tick()
        return output


class Recorder:
    """Hooks a pipeline's components for one run; `profile()` then assembles the Profile."""

    def __init__(self, pipe, shim: Shim | None = None, progress: bool = True, steps: int | None = None):
        self.pipe = pipe
        self.expected_steps = steps  # for the progress bar
        self.shim = shim
        self.progress = progress
        self.comps = {n: _Component(n, m) for n, m in C.discover(pipe).items()}
        if not self.comps:
            raise TierquantError(f"{type(pipe).__name__} has no torch.nn.Module components to profile: "
                             "pass a diffusers pipeline (or an object whose attributes are its models).")
        self.order: list[str] = []
        self.steps_done = 0  # scheduler.step calls seen: the denoising step boundaries
        self._undo: list[Callable[[], None]] = []
        self._bar = None

    # -- installing and removing hooks ---------------------------------------------------------
    def __enter__(self):
        try:
            for comp in self.comps.values():
                add_hook(comp.module, HOOK, _CallHook(self, comp), C.entry_points(comp.module))
                self._undo.append(lambda m=comp.module: remove_hook(m, HOOK))
                for lname, layer, _ in C.quantizable_layers(comp.module):
                    h = layer.register_forward_pre_hook(self._rows_hook(comp, lname), with_kwargs=True)
                    self._undo.append(h.remove)
            sched = getattr(self.pipe, "scheduler", None)
            if sched is not None and callable(getattr(sched, "step", None)):
                add_hook(sched, HOOK, _StepHook(self), ["step"])
                self._undo.append(lambda: remove_hook(sched, HOOK))
            self._t0 = time.perf_counter()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        while self._undo:
            self._undo.pop()()
        if self._bar is not None:
            self._bar[0].stop()
            self._bar = None
        return False

    def _rows_hook(self, comp: _Component, lname: str):
        def hook(module, args, kwargs):
            if comp.counting is not None:
                x = args[0] if args else next(iter(kwargs.values()))
                comp.counting[lname] = comp.counting.get(lname, 0) + x.numel() // max(x.shape[-1], 1)
        return hook

    # -- one outermost call ------------------------------------------------------------------
    def _call(self, comp: _Component, method: str, original, args, kwargs):
        self.order.append(comp.name)
        comp.methods[method] += 1
        comp.steps_at_call.append(self.steps_done)
        device = None if self.shim else _execution_device(comp.module)
        timer = _Timer(device)
        if self.shim:
            args, kwargs = self.shim.inputs(args, kwargs)
            sig = _signature(args, kwargs)
            if comp.shapes_out.get(method, (None,))[0] == sig:
                # Shapes only, nothing to time: a repeat call gives what the counted one gave.
                return self.shim.outputs(comp.shapes_out[method][1])
        if method in comp.counted:
            with timer(comp.clean_seconds[method].append):
                out = original(*args, **kwargs)
        else:
            out = self._counted_call(comp, method, original, args, kwargs, device, timer)
            if self.shim:
                comp.shapes_out[method] = (sig, out)
        return self.shim.outputs(out) if self.shim else out

    def _counted_call(self, comp, method, original, args, kwargs, device, timer):
        c = _Counted()
        comp.counting = c.rows
        cuda = device is not None and device.type == "cuda"
        try:
            with ExitStack() as stack:
                flops = stack.enter_context(flop_counter())
                per_block = stack.enter_context(_block_flops(comp.module, flops))
                # Entered last, so it sees the model's own ops: the FLOP counter decomposes ops it
                # has no formula for (upsampling, ...), whose pieces allocate more than the op does.
                live = None if cuda else stack.enter_context(
                    LiveBytes(transient=self.shim.transient if self.shim else None))
                with timer(lambda s: comp.counted_seconds.__setitem__(method, s)):
                    out = original(*args, **kwargs)
            c.flops = float(flops.get_total_flops())
        finally:
            comp.counting = None
        if cuda:
            # Memory and time from a clean rerun, for the same reason (and it is the warm-up).
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            with timer(comp.clean_seconds[method].append):
                original(*args, **kwargs)
            c.peak = torch.cuda.max_memory_allocated(device) - base
        else:
            c.peak = live.peak
        layers = {n: l for n, l, _ in C.quantizable_layers(comp.module)}
        linear = {n: 2 * r * layers[n].in_features * layers[n].out_features for n, r in c.rows.items()}
        c.linear_flops = float(sum(linear.values()))
        c.block_flops = [[f, float(sum(v for n, v in linear.items() if n.startswith(name + ".")))]
                         for name, f in per_block.items()]
        comp.counted[method] = c
        return out

    # -- progress ----------------------------------------------------------------------------
    def _tick(self):
        if not self.progress:
            return
        if self._bar is None:
            if time.perf_counter() - self._t0 < PROGRESS_AFTER_S:
                return
            from rich.console import Console
            from rich.progress import Progress

            console = Console(stderr=True)
            if not console.is_terminal:
                self.progress = False
                return
            bar = Progress(console=console, transient=True)
            task = bar.add_task(f"profiling {type(self.pipe).__name__}", total=self.expected_steps)
            bar.start()
            self._bar = (bar, task)
        bar, task = self._bar
        bar.update(task, completed=self.steps_done)

    # -- the result --------------------------------------------------------------------------
    def profile(self, steps: int | None, call_kwargs: dict, default_steps: int | None = None) -> Profile:
        phases, phase_of = phases_from_calls(self.order)
        out = {}
        height, width = image_size(self.pipe, call_kwargs)
        for name, comp in self.comps.items():
            out[name] = self._component(comp, phase_of.get(name, -1), steps)
            tiling = tiling_facts(comp.module, height, width)
            if tiling and out[name].activation_peak_bytes:
                out[name].tiled_activation_peak_bytes = int(out[name].activation_peak_bytes * tiling[0])
                out[name].tiled_work = tiling[1]
        if self.shim:
            device = self.shim.device
        else:
            main = max(self.comps.values(), key=lambda c: C.n_params(c.module))
            dev = _execution_device(main.module)
            device = f"cuda:{torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else device_label()
        return Profile(pipeline=type(self.pipe).__name__, components=out, phases=phases, steps=steps,
                       device=device, call_kwargs=jsonable(call_kwargs), default_steps=default_steps)

    def _component(self, comp: _Component, phase: int, steps: int | None) -> ComponentProfile:
        calls = sum(comp.methods.values())
        w = {m: k / calls for m, k in comp.methods.items()} if calls else {}

        def mean(get):
            return sum(w[m] * get(comp.counted[m]) for m in w)

        rows: dict[str, float] = defaultdict(float)
        for m, share in w.items():
            for n, r in comp.counted[m].rows.items():
                rows[n] += share * r
        layers = [Layer(n, l.in_features, l.out_features, rows_per_call=rows.get(n, 0.0), keep=keep)
                  for n, l, keep in C.quantizable_layers(comp.module)]
        return ComponentProfile(
            name=comp.name, class_name=type(comp.module).__name__,
            params=C.n_params(comp.module),  # logical counts: an applied (quantized) pipeline counts as a fresh one
            weight_bytes=C.param_bytes(comp.module),
            calls=calls, methods=dict(comp.methods),
            flops_per_call=mean(lambda c: c.flops), linear_flops_per_call=mean(lambda c: c.linear_flops),
            activation_peak_bytes=max((c.peak for c in comp.counted.values()), default=0),
            phase=phase, seconds_per_call=self._seconds(comp, w),
            layers=layers, largest_block_bytes=C.largest_block_bytes(comp.module),
            repeated_blocks=C.repeated_blocks(comp.module), blocks=C.block_sizes(comp.module),
            block_flops=self._block_flops(comp, w),
            scales_with_steps=self._per_step(comp, steps), attention_heads=C.attention_heads(comp.module))

    @staticmethod
    def _block_flops(comp: _Component, share: dict[str, float]) -> list[list[float]]:
        """Per stream block, [FLOPs, Linear FLOPs] per call, weighted over entry points as the
        component's own FLOPs are; empty where an entry point's count is missing."""
        counts = [comp.counted[m].block_flops for m in share]
        if not counts or any(len(b) != len(counts[0]) for b in counts):
            return []
        return [[sum(share[m] * comp.counted[m].block_flops[i][k] for m in share) for k in (0, 1)]
                for i in range(len(counts[0]))]

    def _seconds(self, comp: _Component, share: dict[str, float]) -> float | None:
        if self.shim or not share:
            return None  # nothing ran for real
        total = 0.0
        for m, s in share.items():
            clean = comp.clean_seconds.get(m)
            total += s * (statistics.median(clean) if clean else comp.counted_seconds[m])
        return total

    def _per_step(self, comp: _Component, steps: int | None) -> bool:
        """Called the same number of times (at least once) in every denoising step.

        Step boundaries come from the scheduler's `step` calls; without a scheduler, from the
        call count alone (a multiple of the steps).
        """
        calls = len(comp.steps_at_call)
        if not calls:
            return False
        n = self.steps_done
        if n >= 2:
            per = Counter(comp.steps_at_call)
            counts = [per.get(k, 0) for k in range(n)]
            return counts[0] > 0 and len(set(counts)) == 1 and sum(counts) == calls
        if n == 1:
            return False  # one step: nothing tells per-step from once-per-generation
        return bool(steps and steps >= 2 and calls >= steps and calls % steps == 0)


def _execution_device(module: torch.nn.Module) -> torch.device:
    """Where the module computes: an offload hook's execution device, else where its weights are."""
    for m in module.modules():
        dev = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if dev is not None:
            return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    return C.device_of(module)


def _signature(args, kwargs):
    """What decides a shape-only call's result: tensor shapes and dtypes, plain values, types."""
    leaves, spec = tree_flatten((args, kwargs))
    out = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            out.append((tuple(x.shape), x.dtype))
        elif x is None or isinstance(x, (bool, int, float, str)):
            out.append(x)
        else:
            out.append(type(x).__name__)
    return str(spec), tuple(out)


def jsonable(kwargs: dict) -> dict:
    """The part of the call kwargs that survives JSON (prompts, sizes, steps, guidance...)."""
    out = {}
    for k, v in kwargs.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            continue
        out[k] = v
    return out


def default_steps(pipe) -> int | None:
    """The pipeline's own num_inference_steps: its __call__'s default, where it has an int one."""
    try:
        p = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
    except (TypeError, ValueError):
        return None
    ok = p is not None and isinstance(p.default, int) and not isinstance(p.default, bool) and p.default > 0
    return p.default if ok else None


def call_steps(pipe, call_kwargs: dict) -> int | None:
    """num_inference_steps of this call: given, or the pipeline's default."""
    if "num_inference_steps" in call_kwargs:
        return call_kwargs["num_inference_steps"]
    return default_steps(pipe)


def image_size(pipe, call_kwargs: dict) -> tuple[int | None, int | None]:
    """The height and width of the images the call makes: as given, or the pipeline's default
    (diffusers: default_sample_size latent pixels times vae_scale_factor)."""
    default = None
    sample, scale = getattr(pipe, "default_sample_size", None), getattr(pipe, "vae_scale_factor", None)
    if isinstance(sample, int) and isinstance(scale, int):
        default = sample * scale
    return call_kwargs.get("height") or default, call_kwargs.get("width") or default


def run(pipe, call_kwargs: dict, shim: Shim | None = None, progress: bool = True) -> tuple[Profile, Any]:
    """Profile one call of `pipe` and return (profile, the pipeline's output)."""
    steps = call_steps(pipe, call_kwargs)
    rec = Recorder(pipe, shim=shim, progress=progress, steps=steps)
    with rec, torch.no_grad():
        result = pipe(**call_kwargs)
    return rec.profile(steps, call_kwargs, default_steps(pipe)), result


def profile(pipe, **call_kwargs) -> Profile:
    """Run `pipe(**call_kwargs)` once with hooks on its components and return what each one cost.

    Use a short run (num_inference_steps=2, say): the profile also records the pipeline's own step
    count (`Profile.default_steps`), which `tierquant.plan` plans for unless given `steps`;
    `Profile.scaled(steps)` gives it for any other count.
    """
    return run(pipe, call_kwargs)[0]
