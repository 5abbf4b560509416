"""The code behind each scheme: one Backend entry per catalog row, found by the scheme's name.

    quantize(module, "int8-weight", keep={"proj_out"})

A backend knows how to quantize a module's Linear layers in place, which config quantizes while a
library loads a checkpoint, and whether its tensors can be saved. What the planner needs to know about a scheme (bytes, rates, errors) is data in `schemes.py`.

Libraries are imported when a scheme runs, never when tierquant is imported: the planner reasons
about schemes without them, and a missing one is reported as "scheme X needs package Y: pip ...".
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from .components import quantizable_layers
from .errors import BackendMissingError, SchemeError
from .schemes import CATALOG

NF4_BLOCKSIZE = 64  # the catalog's bytes_per_param for nf4 assumes one fp32 absmax per 64 weights


class Backend:
    """How one scheme is done."""

    package: str | None = None  # the library to import (None: plain torch)
    saves = True  # a checkpoint can hold its quantized tensors

    def __init__(self, scheme: str):
        self.scheme = scheme

    def require(self):
        """Import the library, or say which package to install."""
        if self.package is None:
            return None
        try:
            return importlib.import_module(self.package)
        except ImportError as e:
            raise BackendMissingError(
                f"scheme {self.scheme!r} needs the {self.package} package, which cannot be imported here ({e}). "
                f"Install it with: pip install {self.package}") from None

    def quantize(self, module: nn.Module, keep: set) -> None:
        """Quantize in place the Linear layers of `module` that `targets` picks."""
        raise NotImplementedError

    def can_quantize(self, layer: nn.Linear) -> str | None:
        """None where this scheme can quantize `layer`, else why not (its shape: `Scheme.packs`).
        Beyond the scheme-independent rules of `components.quantizable_layers`."""
        return CATALOG[self.scheme].packs(layer.in_features, layer.out_features)

    def exclusions(self, module: nn.Module, keep: set = frozenset()) -> dict[str, str]:
        """Layers `components.quantizable_layers` allows (and `keep` does not name) that this scheme
        leaves in high precision, each with why."""
        out = {}
        for name, lin, why in quantizable_layers(module):
            if why is None and name not in keep and _is_plain_linear(lin):
                reason = self.can_quantize(lin)
                if reason:
                    out[name] = reason
        return out

    def load_config(self, library: str, keep: list[str], placement: str, device: torch.device):
        """The `library`'s ("diffusers" or "transformers") quantization config that does this scheme
        while loading, or None where loading in bf16 and quantizing afterwards is the way."""
        return None


def targets(module: nn.Module, keep: set, scheme: "Backend | None" = None) -> list[str]:
    """Qualified names of the plain Linear layers of `module` to quantize: those
    `components.quantizable_layers` allows, `keep` does not name and the scheme can quantize."""
    return [name for name, lin, why in quantizable_layers(module)
            if why is None and name not in keep and _is_plain_linear(lin)
            and (scheme is None or scheme.can_quantize(lin) is None)]


def _is_plain_linear(m: nn.Module) -> bool:
    # Already-quantized layers are Linear subclasses (bnb) or Linears holding tensor subclasses (torchao).
    return type(m) is nn.Linear and type(m.weight) in (nn.Parameter, torch.Tensor)


def is_quantized(layer: nn.Module) -> bool:
    """True for a Linear that a scheme (other than bf16) has quantized."""
    return isinstance(layer, nn.Linear) and not _is_plain_linear(layer)


def _library_class(library: str, name: str):
    if library not in ("diffusers", "transformers"):
        return None
    return getattr(importlib.import_module(library), name)


class Plain(Backend):
    """No quantization: the chosen Linear layers in bf16."""

    def quantize(self, module, keep):
        for name in targets(module, keep, self):
            module.get_submodule(name).to(torch.bfloat16)


class TorchAO(Backend):
    """torchao: weight tensors become tensor subclasses; the Linear modules stay."""

    package = "torchao"

    def __init__(self, scheme: str, config: Callable):
        super().__init__(scheme)
        self._config = config  # torchao.quantization -> the config object

    def config(self):
        self.require()
        cfg = self._config(importlib.import_module("torchao.quantization"))
        # torchao's configs turn on inductor's coordinate-descent tuning for the whole process unless
        # told not to. On an H100 (2026-11-26) it was 196 s of a cold Flux first image against 20 s of
        # compiling, tuned again in every later process, and timed its kernels under the streaming
        # copies: an FP8 Flux plan ran at 3.87 s per image in one process and 3.29 s in the next.
        if hasattr(cfg, "set_inductor_config"):
            cfg.set_inductor_config = False
        return cfg

    def quantize(self, module, keep):
        chosen = set(targets(module, keep, self))
        if not chosen:
            return
        from torchao.quantization import quantize_

        cfg = self.config()
        for name in chosen:  # torchao quantizes in the weight's dtype: make that bf16 like the rest
            module.get_submodule(name).to(torch.bfloat16)
        quantize_(module, cfg, filter_fn=lambda m, fqn: fqn in chosen and isinstance(m, nn.Linear))

    def load_config(self, library, keep, placement, device):
        cls = _library_class(library, "TorchAoConfig")
        # Full module names: diffusers matches "name." inside parameter names, transformers matches from
        # the start of the name (a bare "wo" would not keep T5's wo layers).
        return None if cls is None else cls(self.config(), modules_to_not_convert=keep)


class NF4(Backend):
    """bitsandbytes NF4: each Linear is replaced by a Linear4bit."""

    package = "bitsandbytes"

    def quantize(self, module, keep):
        chosen = targets(module, keep, self)
        if not chosen:
            return
        bnb = self.require()
        for name in chosen:
            old = module.get_submodule(name)
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                    compute_dtype=torch.bfloat16, compress_statistics=False, quant_type="nf4",
                                    device="meta")
            # Params4bit quantizes when moved to a real device: quantize where the layer already is.
            new.weight = bnb.nn.Params4bit(old.weight.data.to(torch.bfloat16), requires_grad=False,
                                           blocksize=NF4_BLOCKSIZE, compress_statistics=False, quant_type="nf4",
                                           module=new).to(old.weight.device)
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.data.to(torch.bfloat16), requires_grad=False)
            new.train(old.training)
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, new)

    def load_config(self, library, keep, placement, device):
        # bitsandbytes' loaders refuse a CPU-only machine, and would load a swapped or streamed
        # component whole onto the GPU: those load in bf16 and are quantized unit by unit instead.
        if device.type != "cuda" or placement != "resident":
            return None
        cls = _library_class(library, "BitsAndBytesConfig")
        return None if cls is None else cls(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=False, llm_int8_skip_modules=keep)


BACKENDS: dict[str, Backend] = {
    b.scheme: b
    for b in [
        Plain("bf16"),
        TorchAO("fp8-dynamic", lambda q: q.Float8DynamicActivationFloat8WeightConfig(granularity=q.PerRow())),
        TorchAO("fp8-weight", lambda q: q.Float8WeightOnlyConfig()),
        TorchAO("int8-weight", lambda q: q.Int8WeightOnlyConfig()),
        TorchAO("int8-dynamic", lambda q: q.Int8DynamicActivationInt8WeightConfig()),
        NF4("nf4"),
    ]
}


def backend(scheme: str) -> Backend:
    if scheme not in BACKENDS:
        raise SchemeError(f"unknown scheme {scheme!r}: choose one of {', '.join(CATALOG)}")
    return BACKENDS[scheme]


def quantize(module: nn.Module, scheme: str, keep: set = frozenset()) -> None:
    """Quantize `module`'s quantizable Linear layers (all but those named in `keep`) in place."""
    backend(scheme).quantize(module, set(keep))
