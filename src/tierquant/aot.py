"""Ahead-of-time packages of repeated blocks: compile once per plan and card, load in any later process.

One package per block variant (a block class, or more than one where instances of a class differ in
their layers: `compilation.variants`) and input signature: one instance is exported with
`torch.export` as a function of (its weights..., its inputs...) into a `.pt2` package, kept as the
exported graph or compiled by AOTInductor (`KINDS`). Because the weights are inputs, not constants
baked into the package, the one package serves every instance of the variant, each called with its
own weights. `Runner` loads either kind; `aot_run` puts packages on a pipeline's blocks.

torchao's quantized weights are tensor subclasses, which an AOTInductor package cannot take as inputs:
each is passed as its plain inner tensors (`__tensor_flatten__`) and made again inside the exported
function (`__tensor_unflatten__`), so the subclass's operations are traced into plain ATen ops. This is
what torchao's `unwrap_tensor_subclass` does for export with parametrizations; here the parameters are
inputs, so it is done on the inputs.

Where packages live: `cache.folder("aot")/<Class>-<key>/<inputs key>.pt2` with a `.json` beside each,
and (from `compilation.prepare`) the same layout in `<plan>.aot/` beside the plan. `<key>` hashes what
the compiled code depends on: the block's class and non-tensor settings, the scheme, the weights' layout
(tensor types, shapes, dtypes, strides), the device (`hardware.device_label()`) and the torch, torchao
and diffusers versions; `<inputs key>` hashes the input signature (shapes, dtypes, constants).
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import cache
from . import components as C
from .hardware import device_label
from .tensors import describe as _describe, leaves as _leaves, unflatten as _unflatten

FORMAT = 1
MAX_REL_ERROR = 0.05  # a package whose output differs more from the eager block's is not kept
# What a package holds (`export_block(kind=...)`):
# - "graph": the exported program itself (`torch.export.save`). A process that loads it compiles it
#   with inductor through `torch.compile` at its first call: dynamo then traces a flat graph of ATen
#   ops on plain tensors, not the block's Python and its tensor subclasses, and inductor's caches (and
#   torch's portable artifacts beside the plan) make that compile a cache hit. No native loader.
# - "aoti": compiled ahead of time by AOTInductor into a shared object: loading compiles nothing. On
#   the lent H100 image (torch 2.11.0+cu130, 2026-11-26) every AOTInductor load crashed, whatever the
#   package (benchmarks/aoti_probe.sh), so it is not the default.
KINDS = ("graph", "aoti")
DEFAULT_KIND = "graph"


def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "machine": platform.machine()}
    for lib in ("torchao", "diffusers"):
        try:
            out[lib] = __import__(lib).__version__
        except Exception:  # noqa: BLE001 - a library that does not import is simply not there
            out[lib] = None
    return out


def store_root() -> Path:
    return cache.folder("aot")


# -- blocks and their inputs -------------------------------------------------------------------
def regions(module: nn.Module) -> list[nn.Module]:
    """The outermost repeated block instances of `module` (what is compiled, exported and streamed)."""
    return C.outermost(C.blocks(module))


def canonical_strides(shape) -> tuple[int, ...]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= max(n, 1)
    return tuple(reversed(out))


def dense_one(x):
    """`x` with the strides of a contiguous tensor (a view where the memory already is, else a
    copy); tuples and lists of tensors one level down too; anything else as it is."""
    if isinstance(x, torch.Tensor):
        if not x.is_contiguous():
            return x.contiguous()
        want = canonical_strides(x.shape)
        return x if x.stride() == want else x.as_strided(x.shape, want, x.storage_offset())
    if type(x) in (tuple, list):
        return type(x)(dense_one(v) for v in x)
    return x


def dense(args: tuple) -> tuple:
    return tuple(dense_one(a) for a in args)


# -- weights as inputs -------------------------------------------------------------------------
class Layout:
    """How a block's parameters and buffers become plain tensors (the package's first inputs) and back.

    `signature` describes the layout (names, tensor types and their metadata, inner shapes, dtypes,
    strides): two blocks with equal signatures can share a package.
    """

    def __init__(self, block: nn.Module):
        self.names: list[str] = []
        self.slots: list[tuple[dict, str]] = []  # where each tensor is held: (module._parameters, key)
        self.descs: list = []
        mods = dict(block.named_modules())
        seen: set[int] = set()
        for kind in ("_parameters", "_buffers"):
            for mname, m in mods.items():
                store = getattr(m, kind)
                for key, t in store.items():
                    if t is None or id(t) in seen:
                        continue
                    seen.add(id(t))
                    self.names.append(f"{mname}.{key}" if mname else key)
                    self.slots.append((store, key))
                    self.descs.append(_describe(t))
        self.signature = [[n, _jsonable(d)] for n, d in zip(self.names, self.descs)]

    def tensors(self, block: nn.Module | None = None) -> list[torch.Tensor]:
        """The plain tensors of the block's current weights, in the package's order. Read at every
        call: placements replace the tensor objects a module holds (a swapped component)."""
        out: list[torch.Tensor] = []
        for (store, key), d in zip(self.slots, self.descs):
            _leaves(store[key], d, out)
        return out

    def rebuild(self, flat) -> dict[str, torch.Tensor]:
        """Name -> tensor, subclasses made again from their inner tensors (inside the exported function)."""
        it = iter(flat)
        return {n: _unflatten(d, it) for n, d in zip(self.names, self.descs)}


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _jsonable(x):
    """A stable JSON-able rendering (object addresses removed) of a layout or module description."""
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, type):
        return f"{x.__module__}.{x.__qualname__}"
    return _ADDRESS.sub("", repr(x))


def module_settings(block: nn.Module) -> list:
    """The non-tensor state the compiled code may depend on: per submodule its class and plain
    attributes (eps, head counts, training, ...), and the class of objects it holds (a processor).
    Instance attributes that stand in for a method (a hook's wrapper of `forward`) are left out."""
    out = []
    for name, m in block.named_modules():
        attrs = {}
        for k, v in sorted(vars(m).items()):
            if k.startswith("_") or callable(getattr(type(m), k, None)) or isinstance(v, (torch.Tensor, nn.Module)):
                continue
            if isinstance(v, (str, int, float, bool)) or v is None:
                attrs[k] = v
            else:
                attrs[k] = f"{type(v).__module__}.{type(v).__qualname__}"
        out.append([name, f"{type(m).__module__}.{type(m).__qualname__}", attrs])
    return out


# -- inputs --------------------------------------------------------------------------------------
class Unsupported(TypeError):
    """An input that a package cannot take (an object other than tensors, containers and scalars)."""


def input_spec(args: tuple, kwargs: dict) -> tuple[tuple, list[torch.Tensor]]:
    """(signature, tensors): a hashable description of the call with tensors as (shape, dtype, device
    type) and scalars as their values, and the tensors in order."""
    tensors: list[torch.Tensor] = []
    spec = (tuple(_spec(a, tensors) for a in args), tuple((k, _spec(v, tensors)) for k, v in kwargs.items()))
    return spec, tensors


def _spec(x, tensors: list):
    if isinstance(x, torch.Tensor):
        tensors.append(x)
        return ("T", tuple(x.shape), str(x.dtype), x.device.type)
    if type(x) in (tuple, list):
        return (type(x).__name__, tuple(_spec(v, tensors) for v in x))
    if type(x) is dict:
        return ("dict", tuple((k, _spec(v, tensors)) for k, v in x.items()))
    if x is None or type(x) in (bool, int, float, str):
        return ("C", x)
    raise Unsupported(f"an input of type {type(x).__name__}")


def _rebuild(s, it):
    tag = s[0]
    if tag == "T":
        return next(it)
    if tag in ("tuple", "list"):
        items = [_rebuild(v, it) for v in s[1]]
        return tuple(items) if tag == "tuple" else items
    if tag == "dict":
        return {k: _rebuild(v, it) for k, v in s[1]}
    return s[1]


def rebuild_call(spec, tensors) -> tuple[tuple, dict]:
    it = iter(tensors)
    args = tuple(_rebuild(a, it) for a in spec[0])
    kwargs = {k: _rebuild(v, it) for k, v in spec[1]}
    return args, kwargs


def _tuplify(x):
    """A spec read back from JSON (lists) as the hashable tuples `input_spec` makes."""
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def spec_key(spec) -> str:
    return cache.key(["inputs", FORMAT, spec])


# -- keys and folders ----------------------------------------------------------------------------
def block_key(block: nn.Module, scheme: str, layout: Layout | None = None) -> str:
    """The folder name of a block class's packages: `<Class>-<hash of what its code depends on>`."""
    layout = layout or Layout(block)
    cls = type(block)
    what = {"format": FORMAT, "block": f"{cls.__module__}.{cls.__qualname__}", "scheme": scheme,
            "settings": module_settings(block), "weights": layout.signature, "device": device_label(),
            "versions": versions()}
    return f"{cls.__name__}-{cache.key(what)}"


def find_packages(roots, folder: str) -> dict[tuple, Path]:
    """Input signature -> package path, from every root that has the block's folder (the first
    root that has a signature wins)."""
    found: dict[tuple, Path] = {}
    for root in roots:
        d = Path(root) / folder
        if not d.is_dir():
            continue
        for meta_path in sorted(d.glob("*.json")):
            meta = cache.read_json(meta_path)
            pkg = meta_path.with_suffix(".pt2")
            if not meta or meta.get("format") != FORMAT or not pkg.exists():
                continue
            found.setdefault(_tuplify(meta["inputs"]), pkg)
    return found


@dataclass
class Example:
    """The first call of one block variant: the instance, its args and kwargs."""

    component: str
    block: nn.Module
    args: tuple
    kwargs: dict


# -- exporting -------------------------------------------------------------------------------------
class BlockFunction(nn.Module):
    """A block as a function of (weights, inputs): what is exported. The block is not a submodule,
    so that its tensors do not become constants of the package."""

    def __init__(self, block: nn.Module, layout: Layout, spec):
        super().__init__()
        object.__setattr__(self, "_block", block)
        self.layout, self.spec = layout, spec

    def forward(self, weights: list[torch.Tensor], inputs: list[torch.Tensor]):
        args, kwargs = rebuild_call(self.spec, inputs)
        return torch.func.functional_call(self._block, self.layout.rebuild(weights), args, kwargs)


class eager:
    """Within: the block runs its plain `_call_impl` (no compiled call)."""

    def __init__(self, block):
        self.block = block

    def __enter__(self):
        self.saved = self.block._compiled_call_impl
        self.block._compiled_call_impl = None

    def __exit__(self, *exc):
        self.block._compiled_call_impl = self.saved
        return False


def export_block(example: Example, scheme: str, root: Path | None = None, extra_roots=(),
                 inductor_configs: dict | None = None, check: bool = True, kind: str = DEFAULT_KIND) -> dict:
    """Export `example.block` with its weights and inputs as inputs into a package of `kind` (`KINDS`)
    in `root` (default: the cache) and copy it into `extra_roots`; check the package against the
    eager block on the example, here (`check`; else `aot_proof` does it in a fresh process). Returns
    what was made: package path, its copies, seconds, relative error. An existing package with the
    same key is reused (and checked again)."""
    if kind not in KINDS:
        raise ValueError(f"unknown package kind {kind!r}: one of {', '.join(KINDS)}")
    root = Path(root) if root is not None else store_root()
    block = example.block
    layout = Layout(block)
    spec, tensors = input_spec(example.args, example.kwargs)
    inputs = [dense_one(t).clone() for t in tensors]
    weights = layout.tensors(block)
    folder = block_key(block, scheme, layout)
    name = spec_key(spec) + ("" if kind == "aoti" else f"-{kind}")
    pkg = root / folder / f"{name}.pt2"
    meta_path = pkg.with_suffix(".json")
    t0 = time.perf_counter()
    reused = pkg.exists() and cache.read_json(meta_path) is not None
    if not reused:
        pkg.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad(), eager(block):
            ep = torch.export.export(BlockFunction(block, layout, spec), (weights, inputs), strict=False)
            tmp = pkg.with_name(f".{pkg.name}.{os.getpid()}.tmp.pt2")
            if kind == "aoti":
                torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp), inductor_configs=inductor_configs)
            else:
                torch.export.save(ep, str(tmp))
        tmp.replace(pkg)
    seconds = time.perf_counter() - t0
    if not reused:  # before the check: a package is read with its description (its kind)
        meta = {"format": FORMAT, "kind": kind, "weights": len(weights),
                "block": f"{type(block).__module__}.{type(block).__qualname__}",
                "scheme": scheme, "component": example.component, "inputs": spec, "device": device_label(),
                "versions": versions(), "export_compile_s": round(seconds, 2), "rel_error": None,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        cache.write_json(meta_path, meta)
    err = check_package(pkg, block, layout, spec, inputs, example) if check else None
    if check and not (err <= MAX_REL_ERROR):  # NaN too
        pkg.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        raise RuntimeError(f"the AOT package of {type(block).__name__} differs from the eager block "
                           f"(relative error {err:.3g} > {MAX_REL_ERROR}): not kept")
    if check and not reused:
        cache.write_json(meta_path, {**meta, "rel_error": err})
    copies = []
    for extra in extra_roots:
        dest = Path(extra) / folder
        dest.mkdir(parents=True, exist_ok=True)
        for src in (pkg, meta_path):
            tmp = dest / f".{src.name}.{os.getpid()}.tmp"
            shutil.copy2(src, tmp)
            tmp.replace(dest / src.name)
        copies.append(str(dest / pkg.name))
    return {"package": str(pkg), "copies": copies, "folder": folder, "seconds": round(seconds, 2),
            "reused": reused, "rel_error": err}


def check_package(pkg: Path, block, layout: Layout, spec, inputs, example: Example) -> float:
    """Relative L2 error of the package's outputs against the eager block's on the example."""
    runner = Runner(pkg)
    with torch.no_grad(), eager(block):
        ref = block(*example.args, **example.kwargs)
        out = runner.run(layout.tensors(block) + list(inputs))
    return rel_error(tensors_of(out), tensors_of(ref))


def rel_error(out: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Relative L2 error of `out` against `ref`, over all their tensors (NaN if they do not pair)."""
    if len(out) != len(ref):
        return float("nan")
    num = sum(float((a.float() - b.to(a.device).float()).pow(2).sum()) for a, b in zip(out, ref))
    return (num / max(sum(float(b.float().pow(2).sum()) for b in ref), 1e-30)) ** 0.5


def tensors_of(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in tensors_of(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in tensors_of(v)]
    return []


# -- running ---------------------------------------------------------------------------------------
class Runner:
    """A loaded package, called with the flat list of (weights..., inputs...).

    An AOTInductor package is called through its loader directly: `AOTICompiledModel.__call__` parses
    its input and output specs from JSON at every call."""

    def __init__(self, path: Path):
        from torch.utils import _pytree as pytree

        self.path = Path(path)
        meta = cache.read_json(self.path.with_suffix(".json")) or {}
        self.kind = meta.get("kind", "aoti")  # packages made before there were kinds are AOTInductor's
        if self.kind == "graph":
            # compiled by inductor at the first call (a cache hit after the first time); the weights
            # and the inputs are the exported function's two lists
            self.weights = int(meta["weights"])
            try:  # the graph may call torchao's own operators: loading it needs them registered
                import torchao  # noqa: F401
            except ImportError:
                pass
            self.compiled = torch.compile(torch.export.load(str(path)).module(), fullgraph=True, dynamic=False)
            return
        self.model = torch._inductor.aoti_load_package(str(path))
        self.loader = self.model.loader
        self.out_spec = pytree.treespec_loads(self.loader.get_call_spec()[1])
        self._unflatten = pytree.tree_unflatten

    def run(self, flat: list[torch.Tensor]):
        if self.kind == "graph":
            flat = list(flat)
            return self.compiled(flat[:self.weights], flat[self.weights:])
        return self._unflatten(self.loader.boxed_run(list(flat)), self.out_spec)
