"""The scheme implementations: one function per catalog scheme, registered with `schemes.register`.

Each takes `(module, keep)` and works in place on the Linear layers of `module` that
`components.quantizable_layers` allows and that `keep` (qualified names inside `module`) does not
name. Everything else -- embeddings, norms, convolutions, kept layers -- is left as it is.

Backends are imported when a scheme runs, never when tierquant is imported: the planner reasons
about schemes without them, and a missing one is reported as "scheme X needs package Y: pip ...".
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from .components import quantizable_layers
from .errors import TierquantError
from .schemes import CATALOG, register

# scheme backend -> (module to import, pip command)
_PACKAGES = {
    "torchao": ("torchao", "pip install torchao"),
    "bitsandbytes": ("bitsandbytes", "pip install bitsandbytes"),
}


class BackendMissingError(TierquantError):
    """A scheme's library cannot be imported."""


def require_backend(scheme: str):
    """Import the library `scheme` needs (None for plain torch), or say which package to install."""
    backend = CATALOG[scheme].backend
    if backend not in _PACKAGES:
        return None
    module, pip = _PACKAGES[backend]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendMissingError(
            f"scheme {scheme!r} needs the {module} package, which cannot be imported here ({e}). "
            f"Install it with: {pip}") from None


def targets(module: nn.Module, keep: set) -> list[str]:
    """Qualified names of the plain Linear layers of `module` to quantize."""
    return [name for name, lin, why in quantizable_layers(module)
            if why is None and name not in keep and _is_plain_linear(lin)]


def _is_plain_linear(m: nn.Module) -> bool:
    # Already-quantized layers are Linear subclasses (bnb) or Linears holding tensor subclasses (torchao).
    return type(m) is nn.Linear and type(m.weight) in (nn.Parameter, torch.Tensor)


@register("bf16")
def bf16(module: nn.Module, keep: set) -> None:
    """No quantization: the chosen Linear layers in bf16."""
    for name in targets(module, keep):
        module.get_submodule(name).to(torch.bfloat16)


# -- torchao: weight tensors become tensor subclasses; the Linear modules stay -----------------
def _torchao_config(scheme: str):
    require_backend(scheme)
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig,
                                      Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, PerRow)

    return {
        "fp8-dynamic": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        "fp8-weight": lambda: Float8WeightOnlyConfig(),
        "int8-weight": lambda: Int8WeightOnlyConfig(),
        "int8-dynamic": lambda: Int8DynamicActivationInt8WeightConfig(),
    }[scheme]()


def torchao_config(scheme: str):
    """The torchao config object for a torchao scheme (also what quantization-on-load uses)."""
    return _torchao_config(scheme)


def _torchao(scheme: str, module: nn.Module, keep: set) -> None:
    chosen = set(targets(module, keep))
    if not chosen:
        return
    from torchao.quantization import quantize_

    cfg = _torchao_config(scheme)
    for name in chosen:  # torchao quantizes in the weight's dtype: make that bf16 like the rest
        module.get_submodule(name).to(torch.bfloat16)
    quantize_(module, cfg, filter_fn=lambda m, fqn: fqn in chosen and isinstance(m, nn.Linear))


for _name in ("fp8-dynamic", "fp8-weight", "int8-weight", "int8-dynamic"):
    register(_name)(lambda module, keep, _s=_name: _torchao(_s, module, keep))


# -- bitsandbytes NF4: each Linear is replaced by a Linear4bit ---------------------------------
NF4_BLOCKSIZE = 64  # the catalog's bytes_per_param assumes one fp32 absmax per 64 weights


@register("nf4")
def nf4(module: nn.Module, keep: set) -> None:
    chosen = targets(module, keep)
    if not chosen:
        return
    bnb = require_backend("nf4")
    for name in chosen:
        old = module.get_submodule(name)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=torch.bfloat16, compress_statistics=False, quant_type="nf4",
                                device="meta")
        # Params4bit quantizes when moved to a real device: quantize where the layer already is.
        device = old.weight.device
        new.weight = bnb.nn.Params4bit(old.weight.data.to(torch.bfloat16), requires_grad=False,
                                       blocksize=NF4_BLOCKSIZE, compress_statistics=False, quant_type="nf4",
                                       module=new).to(device)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data.to(torch.bfloat16), requires_grad=False)
        new.train(old.training)
        _set_submodule(module, name, new)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def is_quantized(layer: nn.Module) -> bool:
    """True for a Linear that a scheme (other than bf16) has quantized."""
    if not isinstance(layer, nn.Linear):
        return False
    return not _is_plain_linear(layer)
