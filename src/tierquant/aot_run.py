"""Ahead-of-time packages on a pipeline's blocks: each block whose variant has packages calls the one
made for its call's input signature, with its own weights (`AOTCall`, in the block's
`_compiled_call_impl`), and falls back to what was there before for any other call. The packages are
made and loaded by `aot`; `compilation.install` and `restore` put these calls on the blocks."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import cache
from .aot import Layout, Runner, Unsupported, dense_one, input_spec


class Packages:
    """A block class's packages by input signature, loaded at their first use (shared by its instances)."""

    def __init__(self, paths: dict[tuple, Path]):
        self.paths = paths
        self.loaded: dict[tuple, Runner] = {}

    def kinds(self) -> set[str]:
        """The kinds (`aot.KINDS`) of these packages, from their descriptions."""
        return {(cache.read_json(Path(p).with_suffix(".json")) or {}).get("kind", "aoti") for p in self.paths.values()}

    def get(self, spec) -> Runner | None:
        r = self.loaded.get(spec)
        if r is None and spec in self.paths:
            r = self.loaded[spec] = Runner(self.paths[spec])
        return r


class AOTCall:
    """Stands in a block's `_compiled_call_impl` (where `module.compile()` puts its compiled call):
    calls the package of the call's input signature with this instance's own weights, or, for
    inputs no package was made for (another resolution, say) or with autograd on, what was there
    before (the JIT-compiled block, or the eager one)."""

    __slots__ = ("block", "layout", "packages", "fallback", "calls", "fallbacks")

    def __init__(self, block: nn.Module, layout: Layout, packages: Packages, fallback):
        self.block, self.layout, self.packages, self.fallback = block, layout, packages, fallback
        self.calls = self.fallbacks = 0

    def __call__(self, *args, **kwargs):
        runner = None
        if not torch.is_grad_enabled():
            try:
                spec, tensors = input_spec(args, kwargs)
                runner = self.packages.get(spec)
            except Unsupported:
                runner = None
        if runner is None:
            self.fallbacks += 1
            return (self.fallback or self.block._call_impl)(*args, **kwargs)
        self.calls += 1
        return runner.run(self.layout.tensors(self.block) + [dense_one(t) for t in tensors])
