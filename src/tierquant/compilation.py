"""Regional compilation: compile each repeated block, so a model's many identical blocks share one
compiled graph per block class (diffusers' `compile_repeated_blocks` where a model declares them)."""
from __future__ import annotations

from torch import nn

from . import components as C


def compile_regions(module: nn.Module, fullgraph: bool) -> list[str]:
    """Compile the repeated blocks of `module`; returns their class names."""
    if getattr(module, "_repeated_blocks", None) and hasattr(module, "compile_repeated_blocks"):
        module.compile_repeated_blocks(fullgraph=fullgraph)
        return list(module._repeated_blocks)
    found = C.outermost(C.blocks(module))
    if not found:
        module.compile()
        return [type(module).__name__]
    for b in found:
        b.compile()  # not fullgraph: other libraries' blocks are not written for it
    return sorted({type(b).__name__ for b in found})
