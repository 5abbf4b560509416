"""Regional compilation, and starting fast in a later process (docs/compile.md).

`compile_regions` compiles a component's repeated blocks (the transformer blocks) just in time: each
block instance gets `module.compile()`, and dynamo keeps its compiled code per code object (the block
class's `forward`), guarded on what the code depends on, not on which instance calls it. So every
distinct block class is compiled once and its code is reused by every instance of that class
(`tests/test_compile.py` counts the graphs on a tiny Flux). One thing defeated this: Flux's first
single block is called with a fresh tensor and the others with a slice of the previous block's
output, and dynamo guards on strides, so the class was compiled twice. Each compiled block is
therefore called with canonically strided tensors (`Region`). Instances of one class that differ
in their layers or code path are compiled once each (SD3's last block, T5's first): `variants`.

A later process can skip compiling (`restore`), best first:
1. AOT packages (`aot.py`): one package per block variant and input signature (the exported graph,
   or AOTInductor's compile of it), exported with the weights as inputs so that one package serves
   every instance; made by `prepare` (`tierquant compile PLAN`), kept in the cache
   (`cache.folder("aot")`) and beside the plan.
2. torch's portable compile artifacts (`torch.compiler.save_cache_artifacts`), in
   `<plan>.compile-cache.bin` beside the plan: dynamo still traces, inductor skips most of its work.
3. Just-in-time regional compilation (what `apply` arms): compiled at the first call.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import aot as A
from . import aot_proof
from . import components as C
from .aot import Example, Layout, block_key, dense, dense_one, find_packages, regions  # noqa: F401
from .aot_run import AOTCall, Packages
from .errors import TierquantError

# The torch.compile backend of `compile_regions` (tests put a counting backend here).
DEFAULT_BACKEND: "str | Callable" = "inductor"

MODES = ("aot", "artifacts", "jit")  # best first


# -- just in time ------------------------------------------------------------------------------
def compile_regions(module: nn.Module, fullgraph: bool, backend: "str | Callable | None" = None,
                    hooks_outside: bool = False) -> list[str]:
    """Compile the repeated blocks of `module` at their first call; returns their class names.

    Blocks of a model that declares `_repeated_blocks` (diffusers) are compiled with `fullgraph`;
    blocks found otherwise (a text encoder's layers) never are: other libraries' blocks are not
    written for it. A module without repeated blocks is compiled whole.
    hooks_outside: compile each block's `forward` rather than its whole call, so that forward hooks
    on the blocks (block streaming's copies, `streaming.py`) run eagerly around the compiled code.
    """
    backend = DEFAULT_BACKEND if backend is None else backend
    found = regions(module)
    if not found:
        module.compile(backend=backend)
        return [type(module).__name__]
    declared = list(getattr(module, "_repeated_blocks", None) or [])
    for b in found:
        if hooks_outside:
            b.forward = Region(torch.compile(b.forward, backend=backend, fullgraph=bool(fullgraph and declared)))
            continue
        b.compile(backend=backend, fullgraph=bool(fullgraph and declared))
        b._compiled_call_impl = Region(b._compiled_call_impl)
    names = {type(b).__name__ for b in found}
    return [n for n in declared if n in names] or sorted(names)


def uncompile_regions(module: nn.Module) -> None:
    """Undo `compile_regions` (and AOT calls): every block runs eagerly again."""
    for b in [module, *module.modules()]:
        if getattr(b, "_compiled_call_impl", None) is not None:
            b._compiled_call_impl = None
        if isinstance(vars(b).get("forward"), (Region, AOTCall)):  # through forward (hooks_outside)
            del b.forward


class Region:
    """A compiled block's call, given tensors with the strides of a contiguous tensor.

    Dynamo guards on input strides: Flux's first single block gets a fresh tensor, the others a
    slice of the previous block's output, and without this the class compiled twice. With batch 1
    such a slice is contiguous in memory and only the stride of its size-1 batch dimension differs:
    it is given the canonical strides as a view, no copy. A slice that really is scattered in memory
    (batch > 1) is copied: one read and write of the activation, next to a block's matmuls over it.
    """

    __slots__ = ("compiled",)

    def __init__(self, compiled: Callable):
        self.compiled = compiled

    def __call__(self, *args, **kwargs):
        return self.compiled(*dense(args), **{k: dense_one(v) for k, v in kwargs.items()})


# -- variants: the blocks that share compiled code ----------------------------------------------
def variants(module: nn.Module, scheme: str) -> dict[str, list[nn.Module]]:
    """The repeated blocks grouped by what their compiled code depends on (`aot.block_key`,
    `<Class>-<hash>`): one group per block class, or more where instances of a class differ in
    their layers (SD3's last block has no context output; T5's first holds the position bias)."""
    out: dict[str, list[nn.Module]] = {}
    for b in regions(module):
        out.setdefault(block_key(b, scheme), []).append(b)
    return out


# -- capturing real inputs ------------------------------------------------------------------------
class _Enough(Exception):
    pass


def capture(pipe, comps: dict[str, nn.Module], call: dict, schemes: dict[str, str]) -> dict[str, dict[str, Example]]:
    """Run `pipe(**call)` eagerly until each variant of the blocks of `comps` (name -> component;
    `schemes`: name -> scheme) has been called once; returns component -> variant -> its first
    call. The run stops there (the rest of the generation is not needed), or runs to its end if
    some variant is never called."""
    key_of = {id(b): (n, k) for n, m in comps.items() for k, bs in variants(m, schemes[n]).items() for b in bs}
    want = set(key_of.values())
    got: dict[str, dict[str, Example]] = {}
    handles, stashed = [], []

    def hook(block, args, kwargs):
        name, key = key_of[id(block)]
        if key not in got.setdefault(name, {}):
            got[name][key] = Example(name, block, args, dict(kwargs))
            if all(k in got.get(n, {}) for n, k in want):
                raise _Enough

    for name, m in comps.items():
        for b in regions(m):
            # eager: hooks inside a compiled call would be traced (and a streamed component's blocks
            # are compiled through `forward`)
            stashed.append((b, b._compiled_call_impl, vars(b).pop("forward", None)))
            b._compiled_call_impl = None
            handles.append(b.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            pipe(**call)
    except _Enough:
        pass
    finally:
        for h in handles:
            h.remove()
        for b, impl, forward in stashed:
            b._compiled_call_impl = impl
            if forward is not None:
                b.forward = forward
    return got


# -- AOT calls on blocks ---------------------------------------------------------------------------
def install(module: nn.Module, scheme: str, roots, hooks_outside: bool = False) -> dict[str, int]:
    """Put AOT calls on the blocks of `module` whose variant has packages under `roots`; returns
    variant -> number of packages found (0: none, those blocks are left as they were).
    hooks_outside: in each block's `forward`, not its whole call, as `compile_regions` put the
    compiled code of a streamed component: the streaming hooks around the block bring its weights
    before the package reads them."""
    out: dict[str, int] = {}
    for key, blocks in variants(module, scheme).items():
        found = find_packages(roots, key)
        out[key] = len(found)
        if not found:
            continue
        packages = Packages(found)
        for b in blocks:
            if hooks_outside:
                current = vars(b).get("forward")
                fallback = current.fallback if isinstance(current, AOTCall) else current
                # never `_call_impl` (it calls forward): the class's own forward where nothing compiled
                b.forward = AOTCall(b, Layout(b), packages, fallback or type(b).forward.__get__(b))
                continue
            current = b._compiled_call_impl
            fallback = current.fallback if isinstance(current, AOTCall) else current
            b._compiled_call_impl = AOTCall(b, Layout(b), packages, fallback)
    return out


def _aot_calls(module: nn.Module):
    """(block, its AOT call) for each block of `module` that has one, in its call or its forward."""
    for b in regions(module):
        for c in (b._compiled_call_impl, vars(b).get("forward")):
            if isinstance(c, AOTCall):
                yield b, c


def installed_kinds(module: nn.Module) -> list[str]:
    """The kinds of the AOT packages on `module`'s blocks."""
    return sorted({k for _, c in _aot_calls(module) for k in c.packages.kinds()})


def uninstall(module: nn.Module) -> None:
    """Take the AOT calls off `module`'s blocks, putting back what was there before."""
    for b, c in list(_aot_calls(module)):
        if b._compiled_call_impl is c:
            b._compiled_call_impl = c.fallback
        elif isinstance(c.fallback, Region):
            b.forward = c.fallback
        else:
            del b.forward  # the class's own forward again


def usage(module: nn.Module) -> dict[str, dict[str, int]]:
    """Per block class: calls that ran an AOT package and calls that fell back, so far."""
    out: dict[str, dict[str, int]] = {}
    for b, c in _aot_calls(module):
        u = out.setdefault(type(b).__name__, {"aot": 0, "fallback": 0})
        u["aot"] += c.calls
        u["fallback"] += c.fallbacks
    return out


# -- torch's portable artifacts -----------------------------------------------------------------
def artifacts_path(plan_path) -> Path:
    """Where torch's compile artifacts of a plan live: beside it, `<plan>.compile-cache.bin`."""
    return Path(plan_path).with_suffix(".compile-cache.bin")


def load_artifacts(path) -> str | None:
    """Load torch's compile artifacts from `path`; None if done, else why not (a stale or damaged
    file only costs a cold compile, never an error)."""
    path = Path(path)
    if not path.exists():
        return f"no {path.name}"
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as e:  # noqa: BLE001
        return f"ignored {path}: {type(e).__name__}: {e}"
    return None


def save_artifacts(path) -> bool:
    """Write what this process compiled as torch's portable artifacts to `path` (atomically)."""
    saved = torch.compiler.save_cache_artifacts()
    if not saved or not saved[0]:
        return False
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(saved[0])
    tmp.replace(path)
    return True


def compile_stats() -> dict:
    """What compiling cost this process so far: seconds per stage by dynamo's own timers (tracing,
    AOT autograd, inductor, cache loads, guards; those over 10 ms) and its counters (graphs,
    recompilations, cache hits and misses). Where a first image's seconds went (`tierquant run`)."""
    from torch._dynamo.utils import compile_times, counters

    names, values = compile_times(repr="csv", aggregate=True)
    seconds = {n: round(float(v), 3) for n, v in zip(names, values) if float(v) >= 0.01}
    return {"seconds": seconds, "counters": {k: dict(counters[k]) for k in ("stats", "inductor", "aot_autograd",
                                                                         "recompiles") if counters.get(k)}}


def _prove(exported: dict[str, dict], cases: dict[tuple, "aot_proof.Case"]) -> None:
    """Step 3 of `prepare`: every made package proven in one fresh process; what fails is deleted,
    and its entry in `exported` says why instead."""
    made = [(n, k, r) for n, by in exported.items() for k, r in by.items() if "error" not in r]
    errors, why = aot_proof.prove([cases[n, k] for n, k, r in made])
    for i, (n, k, r) in enumerate(made):
        err = errors[i] if why is None else None
        if why is None and err <= A.MAX_REL_ERROR:
            r["rel_error"] = err
            continue
        for path in [r["package"], *r.get("copies", [])]:
            aot_proof.discard(path)
        exported[n][k] = {"error": why or f"the package's output differs from the eager block's "
                                          f"(relative error {err:.3g} > {A.MAX_REL_ERROR}): not kept"}


# -- choosing: AOT > artifacts > JIT ------------------------------------------------------------
@dataclass
class CompileReport:
    """How each compiled component starts: per component, "aot", "artifacts" or "jit", with the
    block variants that have AOT packages, and why not where it is not "aot"."""

    components: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def mode(self) -> str | None:
        """The worst mode of any component (what the first image will pay for); None if nothing compiles."""
        modes = [c["mode"] for c in self.components.values()]
        return max(modes, key=MODES.index) if modes else None

    def to_dict(self) -> dict:
        return {"mode": self.mode, "components": self.components, "notes": self.notes}

    def lines(self) -> list[str]:
        out = []
        for name, c in self.components.items():
            what = {"aot": "ahead-of-time packages", "artifacts": "torch's compile artifacts",
                    "jit": "compiled at the first call"}[c["mode"]]
            if "graph" in c.get("kinds", ()):
                what += " (exported graphs: inductor compiles them at the first call, from its cache or the saved artifacts)"
            extra = f" ({'; '.join(c['why'])})" if c.get("why") else ""
            out.append(f"{name}: {what}{extra}")
        return out + self.notes


def compiled_components(pipe, plan) -> dict[str, nn.Module]:
    """The components the plan compiles, by name."""
    comps = C.discover(pipe)
    return {n: comps[n] for n, ch in plan.components.items() if ch.compile and n in comps}


def aot_eligible(plan, name: str) -> str | None:
    """None if component `name` can run AOT packages, else why not."""
    from .schemes import CATALOG

    ch = plan.components[name]
    if not CATALOG[ch.scheme].composes_with_compile:
        return f"{ch.scheme} does not compose with compilation"
    return None


def aot_roots(plan_path=None) -> list[Path]:
    """Where AOT packages are looked for, first found wins: beside the plan, then the cache."""
    from . import cache

    roots = [aot_beside(plan_path)] if plan_path else []
    return roots + [cache.folder("aot")]


def aot_beside(plan_path) -> Path:
    return Path(plan_path).with_suffix(".aot")


def restore(pipe, plan, *, plan_path=None, aot: bool = True, artifacts: bool = True,
            quiet: bool = False) -> CompileReport:
    """Before the first image of a process: give each compiled component the best start there is.

    torch's artifacts beside the plan are loaded first when there. Components with an AOT package for
    every block variant run them (a call with inputs no package was made for falls back to the
    JIT-compiled block; graph packages compile at their first call, from those artifacts or inductor's
    cache); the others start from the artifacts, or compile at their first call, as `apply` armed them.
    `pipe` must have been applied with `plan` (compiling components have their blocks armed).
    """
    report = CompileReport()
    need_artifacts = []
    comps = compiled_components(pipe, plan)
    # First, and whatever else starts them: graph packages compile at their first call too.
    failed = (load_artifacts(artifacts_path(plan_path)) if comps and artifacts and plan_path
              else "no artifacts asked for")
    for name, module in comps.items():
        why = aot_eligible(plan, name)
        if why is None and aot:
            got = install(module, plan.components[name].scheme, aot_roots(plan_path),
                          hooks_outside=plan.components[name].placement == "streamed")
            missing = sorted(c for c, n in got.items() if not n)
            if got and not missing:
                report.components[name] = {"mode": "aot", "variants": sorted(got), "why": [],
                                           "kinds": installed_kinds(module)}
                continue
            if any(got.values()):  # a partial set would still compile the rest: all or none
                uninstall(module)
            why = f"no AOT package for {', '.join(missing) or 'its blocks'} on {A.device_label()}"
        report.components[name] = {"mode": "jit", "variants": [], "why": [why] if why else []}
        need_artifacts.append(name)
    if need_artifacts and artifacts and plan_path:
        for n in need_artifacts:
            if failed is None:
                report.components[n]["mode"] = "artifacts"
            else:
                report.components[n]["why"].append(failed)
    if not quiet:
        for line in report.lines():
            print(f"compile: {line}", file=sys.stderr)
    return report


def check_packages(packages: str | None) -> None:
    if packages is not None and packages not in A.KINDS:
        raise TierquantError(f"no package kind {packages!r}: the kinds are {', '.join(A.KINDS)}")


def prepare(pipe, plan, call: dict, *, plan_path=None, packages: str | None = None, artifacts: bool = True,
            beside_plan: bool = True, quiet: bool = False) -> CompileReport:
    """Compile once per plan and card: what `tierquant compile PLAN` does, in the process that
    applied `plan` to `pipe`. Without `packages`, only step 5 (no ahead-of-time packages: on an H100
    graph packages started a later process slower than torch's artifacts alone, docs/compile.md).

    1. Runs `pipe(**call)` eagerly until every block variant (`variants`: one per class, mostly) of
       the compiled components has been called once, keeping each one's first inputs (the run stops
       there).
    2. Exports one instance of each variant with the weights as inputs into a package of the kind
       `packages` (`aot.KINDS`: the exported graph, or AOTInductor's compiled one) in the cache (and
       beside the plan, `<plan>.aot/`, unless `beside_plan=False`). A component with a variant whose
       export or compile fails stays JIT (all or none), with the error said.
    3. Has a fresh process load all the packages and run them (`aot_proof`): if it dies, or a
       package's output differs from the eager block's, those packages are deleted and their
       components stay JIT, with the reason said.
    4. Installs the packages (this process uses them too), as `restore` would.
    5. If a component is still JIT (NF4, or a failed export), or its packages are graphs
       (compiled by inductor in the process that loads them), runs `pipe(**call)` once so that they
       compile, and saves torch's artifacts beside the plan: a later process loads them first.
    """
    check_packages(packages)
    comps = compiled_components(pipe, plan)
    report = CompileReport()
    exported: dict[str, dict] = {}
    eligible = {n: m for n, m in comps.items() if packages and aot_eligible(plan, n) is None}
    if eligible:
        examples = capture(pipe, eligible, call, {n: plan.components[n].scheme for n in eligible})
        roots = [aot_beside(plan_path)] if plan_path and beside_plan else []
        streamers = getattr(pipe, "_tierquant_streamers", None) or {}
        cases = {}
        for name, module in eligible.items():
            scheme = plan.components[name].scheme
            exported[name] = {}
            for key, ex in examples.get(name, {}).items():
                with (streamers[name].holding(ex.block) if name in streamers else contextlib.nullcontext()):
                    try:
                        r = A.export_block(ex, scheme, A.store_root(), extra_roots=roots, check=False, kind=packages)
                        cases[name, key] = aot_proof.case(ex, r["package"])  # holds the weights it read
                    except Exception as e:  # noqa: BLE001 - a block that does not export is compiled just in time
                        r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                exported[name][key] = r
        _prove(exported, cases)
    for name, module in comps.items():
        why = aot_eligible(plan, name) if packages else "no packages asked for"
        errors = [f"{c}: {r['error']}" for c, r in exported.get(name, {}).items() if "error" in r]
        if why is None and not errors:
            got = install(module, plan.components[name].scheme, aot_roots(plan_path if beside_plan else None),
                          hooks_outside=plan.components[name].placement == "streamed")
            if got and all(got.values()):
                report.components[name] = {"mode": "aot", "variants": sorted(got), "why": [],
                                           "kinds": installed_kinds(module), "packages": exported.get(name, {})}
                continue
            uninstall(module)
            why = "no package was made for " + ", ".join(sorted(c for c, n in got.items() if not n))
        report.components[name] = {"mode": "jit", "variants": [], "why": ([why] if why else []) + errors}
    jit = [n for n, c in report.components.items() if c["mode"] == "jit"]
    if (jit or (packages == "graph" and report.mode == "aot")) and artifacts:
        pipe(**call)  # compiles the JIT regions, and the graph packages
        if plan_path and save_artifacts(artifacts_path(plan_path)):
            for n in jit:
                report.components[n]["mode"] = "artifacts"
            report.notes.append(f"saved torch's compile artifacts to {artifacts_path(plan_path)}")
    if not quiet:
        for line in report.lines():
            print(f"compile: {line}", file=sys.stderr)
    return report
