"""Finding a pipeline's components, how the pipeline calls them, and which of their layers to quantize."""
from __future__ import annotations

import inspect
import re

import torch
from accelerate.utils import compute_module_sizes
from torch import nn

# A Linear whose smaller side is under this many features is left in bf16: the quantize /
# dequantize overhead outweighs what it saves, and 4-bit block sizes (64) do not divide it.
MIN_FEATURES = 64

# Methods a pipeline may call on a component that never compute anything worth measuring.
_NOT_ENTRY = re.compile(r"^(from_|save_|load_|enable_|disable_|set_|get_|fuse_|unfuse_|register_|to$|cuda$|cpu$|"
                        r"half$|float$|train$|eval$|apply$|state_dict$|named_|parameters$|buffers$|modules$|children$|"
                        r"num_parameters$|compile|resize_|tie_|post_init|init_|gradient_|prepare_|push_|"
                        r"add_|delete_|reset_|can_|warn_|retrieve_|dequantize)")


def discover(pipe) -> dict[str, nn.Module]:
    """The pipeline's torch.nn.Module components by name, in registration order."""
    source = getattr(pipe, "components", None)
    if not isinstance(source, dict):
        # Objects without a __dict__ (an int, a str) have no components.
        source = {k: v for k, v in getattr(pipe, "__dict__", {}).items() if not k.startswith("_")}
    return {name: m for name, m in source.items() if isinstance(m, nn.Module)}


def entry_points(module: nn.Module) -> list[str]:
    """Public methods that a pipeline may call to run this component: forward, decode, encode, ...

    Found from the class (not from names known in advance): plain functions defined by the model's
    own classes, below torch's and the libraries' base classes.
    """
    names = ["forward"]
    for cls in type(module).__mro__:
        if not _is_model_class(cls):
            continue
        for name, value in vars(cls).items():
            if name.startswith("_") or name in names or _NOT_ENTRY.match(name):
                continue
            # Context managers (diffusers' `cache_context`) wrap the calls that cost; they are not one.
            if inspect.isfunction(value) and not inspect.isgeneratorfunction(inspect.unwrap(value)):
                names.append(name)
    return names


def _is_model_class(cls) -> bool:
    """A class of the model itself: not torch's, nor a library's shared base classes and mixins."""
    mod = cls.__module__
    if cls is object or mod.startswith(("torch", "accelerate", "huggingface_hub", "builtins", "typing")):
        return False
    if mod.startswith("diffusers."):
        return mod.startswith("diffusers.models.") and not mod.startswith("diffusers.models.modeling_")
    if mod.startswith("transformers."):
        return mod.startswith("transformers.models.")
    return True


def keep_in_fp32_patterns(module: nn.Module) -> list[str]:
    pats = getattr(module, "_keep_in_fp32_modules", None) or []
    return list(pats)


def quantizable_layers(module: nn.Module) -> list[tuple[str, nn.Linear, str | None]]:
    """Every Linear in `module` with the reason it must stay in high precision (None: quantize it).

    Embeddings, norms and convolutions are not Linear and so are never quantized.
    """
    fp32 = keep_in_fp32_patterns(module)
    out = []
    for name, m in module.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        parts = name.split(".")
        if any(p in parts for p in fp32):
            out.append((name, m, "the model keeps it in fp32 (_keep_in_fp32_modules)"))
        elif min(m.in_features, m.out_features) < MIN_FEATURES:
            out.append((name, m, f"too small for quantization to pay (under {MIN_FEATURES} features)"))
        else:
            out.append((name, m, None))
    return out


def repeated_blocks(module: nn.Module) -> list[str]:
    """Class names of the blocks to compile regionally.

    The model's own `_repeated_blocks` where diffusers defines it; otherwise the classes of the
    modules found in its ModuleLists (the transformer blocks of a text encoder, say).
    """
    declared = getattr(module, "_repeated_blocks", None)
    if declared:
        return list(declared)
    found: list[str] = []
    for m in module.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1:
            name = type(m[0]).__name__
            if all(type(x).__name__ == name for x in m) and name not in found:
                found.append(name)
    return found


def blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated block instances (what regional compilation and streaming work on)."""
    names = set(repeated_blocks(module))
    return [m for m in module.modules() if type(m).__name__ in names]


def outermost(found: list[nn.Module]) -> list[nn.Module]:
    """The blocks not inside another block of the list."""
    inner = {id(d) for b in found for d in b.modules() if d is not b}
    return [b for b in found if id(b) not in inner]


def stream_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) of the outermost repeated blocks, in module order: what a component
    streams one at a time, and what stays resident when only part of it fits."""
    keep = {id(b) for b in outermost(blocks(module))}
    return [(n, m) for n, m in module.named_modules() if id(m) in keep]


def block_sizes(module: nn.Module) -> list[list[int]]:
    """[parameters, quantizable parameters] of each stream block, in module order (plain data for
    the profile: the cost model prices partial residency from it)."""
    found = stream_blocks(module)
    out = [[n_params(b), 0] for _, b in found]
    for lname, lin, why in quantizable_layers(module):
        if why is None:
            for i, (bname, _) in enumerate(found):
                if lname.startswith(bname + "."):
                    out[i][1] += lin.in_features * lin.out_features
                    break
    return out


def n_params(module: nn.Module) -> int:
    """Parameters, each counted once (tied weights, such as T5's shared embedding, are one), at their
    logical (unquantized) size: a quantized pipeline counts as the fresh one it came from."""
    return sum(logical_numel(p) for p in module.parameters())


def logical_numel(t: torch.Tensor) -> int:
    """Elements of the tensor a quantized one stands for. bitsandbytes' Params4bit packs two 4-bit
    values per byte (its numel is half, or less once repacked for the CPU): its quant_state has the
    real shape. torchao's tensor subclasses already report their logical shape."""
    shape = getattr(getattr(t, "quant_state", None), "shape", None)
    if shape is not None:
        n = 1
        for d in shape:
            n *= int(d)
        return n
    return t.numel()


def param_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers as they are (accelerate's count; meta tensors too)."""
    return compute_module_sizes(module)[""]


def largest_block_bytes(module: nn.Module) -> int:
    """The most bytes a streamed component needs on the device at once: its largest repeated block,
    else its largest child."""
    sizes = compute_module_sizes(module)
    names = {id(m): n for n, m in module.named_modules()}
    candidates = blocks(module) or list(module.children()) or [module]
    return max(sizes[names[id(b)]] for b in candidates)


def attention_heads(module: nn.Module) -> int:
    """The model's attention heads from its config (diffusers' and transformers' name for it); 0 if none."""
    heads = getattr(getattr(module, "config", None), "num_attention_heads", None)
    return heads if isinstance(heads, int) and not isinstance(heads, bool) else 0


def device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
