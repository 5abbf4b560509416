"""Units: the pieces of a component that move to the device at once while a plan is applied.

A unit is a repeated block (a transformer block), or a submodule that holds no block and is no
bigger than the largest block, or the few tensors a module owns directly. Quantizing unit by unit
on the device means the bf16 copy of a whole component never has to sit there.
"""
from __future__ import annotations

import torch
from accelerate.utils import compute_module_sizes
from torch import nn

from . import components as C
from .tensors import move_tensors


def units(module: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """(qualified name, module, recurse) in order: every repeated block whole; every other submodule
    whole when it holds no block and is no bigger than the largest block (the planner's figure for
    what apply adds on the device, `components.largest_block_bytes`), else its children one by one;
    and (recurse=False) the tensors a split module owns directly."""
    found = C.blocks(module)
    block_ids = {id(b) for b in found}
    sizes = compute_module_sizes(module)  # qualified name -> bytes, once for the whole component
    limit = C.largest_block_bytes(module)
    out: list[tuple[str, nn.Module, bool]] = []

    def walk(m: nn.Module, prefix: str) -> None:
        holds_block = any(id(d) in block_ids for d in m.modules())
        leaf = next(m.children(), None) is None
        if id(m) in block_ids or (not holds_block and (leaf or sizes[prefix] <= limit)):
            out.append((prefix, m, True))
            return
        if m._parameters or m._buffers:
            out.append((prefix, m, False))
        for child_name, child in m.named_children():
            walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    walk(module, "")
    return out


def unit_modules(unit: nn.Module, prefix: str, recurse: bool):
    if not recurse:
        return [(prefix, unit)]
    return [(f"{prefix}.{n}" if prefix and n else (n or prefix), m) for n, m in unit.named_modules()]


def move_unit(unit, prefix, recurse, device, non_blocking=False) -> None:
    # Everything not quantized runs in bf16, the layers a model lists in `_keep_in_fp32_modules`
    # included: that list guards against fp16 overflow (T5's wo), which bf16's range does not have;
    # transformers too loads them in bf16 when asked for bf16. They are kept out of quantization.
    for _, m in unit_modules(unit, prefix, recurse):
        move_tensors(m, device, torch.bfloat16, non_blocking)
