"""Regional compilation: compile each repeated block, so a model's many identical blocks share one
compiled graph per block class (diffusers' `compile_repeated_blocks` where a model declares them)."""
from __future__ import annotations

import torch
from torch import nn

from . import components as C


def compile_regions(module: nn.Module, fullgraph: bool, hooks_outside: bool = False) -> list[str]:
    """Compile the repeated blocks of `module`; returns their class names.

    hooks_outside: compile each block's `forward` rather than its `__call__`, so that forward hooks
    on the blocks (block streaming's copies) run eagerly around the compiled code, not inside it.
    """
    declared = bool(getattr(module, "_repeated_blocks", None))
    if hooks_outside:
        found = [b for _, b in C.stream_blocks(module)]
        for b in found:
            # not fullgraph for other libraries' blocks: they are not written for it
            b.forward = torch.compile(b.forward, fullgraph=fullgraph and declared)
        return sorted({type(b).__name__ for b in found})
    if declared and hasattr(module, "compile_repeated_blocks"):
        module.compile_repeated_blocks(fullgraph=fullgraph)
        return list(module._repeated_blocks)
    found = C.outermost(C.blocks(module))
    if not found:
        module.compile()
        return [type(module).__name__]
    for b in found:
        b.compile()  # not fullgraph: other libraries' blocks are not written for it
    return sorted({type(b).__name__ for b in found})
