"""The scheme catalog: what each quantization scheme costs, needs and composes with.

Schemes are data. The function that applies one lives behind `register`/`apply_scheme`, filled in by
`quantize.py`, so that the planner can reason about schemes without importing any backend.
"""
from __future__ import annotations

from .errors import TierquantError

from dataclasses import dataclass
from typing import Callable

import torch


class SchemeError(TierquantError):
    pass


@dataclass(frozen=True)
class Scheme:
    name: str
    backend: str  # "torch" | "torchao" | "bitsandbytes": the library that does the work
    bytes_per_param: float  # for the quantized linear weights, scales included
    math: str  # "bf16" | "fp8" | "int8": the tensor-core rate the matmuls run at
    weight_only: bool
    needs_fp8: bool  # needs FP8 tensor cores (compute capability >= 8.9)
    needs_cuda: bool
    composes_with_offload: bool  # survives being moved between host and device
    composes_with_compile: bool  # torch.compile traces it (regional compile)
    # Efficiency: fraction of the `math` peak that whole-component matmul work reaches, eager and
    # regionally compiled. Priors from one H200 run of the Flux transformer (shared/gpu/NOTES.md,
    # 2026-11-26): bf16 0.173 s eager / 0.133 compiled; fp8-dynamic 0.269 / 0.0997; int8-weight
    # 0.234, fp8-weight 0.276, nf4 0.208 eager; 74.4 TFLOP per step. Where no compiled run exists,
    # compile is assumed to gain what it gained for bf16 (1.3x).
    efficiency_eager: float
    efficiency_compiled: float
    # Prior relative output error of one quantized component, used by `tolerance` until a measured
    # sensitivity exists. From all-MiniLM-L6-v2 token embeddings on CPU (NOTES.md): 1 - cosine of
    # int8-weight 0.9995, fp8-weight 0.9985, int8-dynamic 0.997, nf4 0.974.
    error_prior: float
    description: str = ""
    # Streams block by block through diffusers' group offloading. NF4 does not: on an H200 (torch
    # 2.11, bitsandbytes 0.50.2, 2026-11-26) the streamed NF4 Flux transformer stopped with "CUDA
    # error: an illegal memory access" (group offloading moves `.data`, not bitsandbytes' quant state).
    streams: bool = True
    # Host-side cost of one eager Linear call on a GPU (launches, and for torchao / bitsandbytes the
    # Python dispatch of their tensor types); compiled regions pay COMPILED_OVERHEAD_S. Estimates, not
    # measurements: they matter only for small models, where they dominate the roofline.
    eager_overhead_s: float = 15e-6

    def available_on(self, hw) -> str | None:
        """None if the scheme runs on `hw`, else why not."""
        if self.needs_cuda and hw.device != "cuda":
            return f"{self.name} needs a CUDA GPU ({self.backend})"
        if self.needs_fp8 and not hw.has_fp8:
            cc = f"compute capability {hw.capability[0]}.{hw.capability[1]}" if hw.capability else "no GPU"
            return f"{self.name} needs FP8 tensor cores (compute capability 8.9 or more); {hw.name} has {cc}"
        return None


# Linear weights lose 2 bytes per param in bf16 to 1 byte (+ one fp32 scale per output row, which is
# negligible) in 8-bit schemes, and to 0.5 byte + one fp32 absmax per 64-weight block in NF4.
CATALOG: dict[str, Scheme] = {
    s.name: s
    for s in [
        Scheme("bf16", "torch", 2.0, "bf16", True, False, False, True, True, 0.43, 0.57, 0.0,
               "no quantization", eager_overhead_s=5e-6),
        Scheme("fp8-dynamic", "torchao", 1.0, "fp8", False, True, True, True, True, 0.14, 0.38, 0.003,
               "torchao Float8DynamicActivationFloat8WeightConfig, row-wise scales"),
        Scheme("fp8-weight", "torchao", 1.0, "bf16", True, False, False, True, True, 0.27, 0.35, 0.0015,
               "torchao Float8WeightOnlyConfig"),
        Scheme("int8-weight", "torchao", 1.0, "bf16", True, False, False, True, True, 0.32, 0.42, 0.0005,
               "torchao Int8WeightOnlyConfig"),
        # torch._int_mm writes int32 outputs that a second kernel rescales (4+4 extra bytes per output
        # element), where FP8 `_scaled_mm` rescales in its epilogue: a lower prior than fp8-dynamic.
        Scheme("int8-dynamic", "torchao", 1.0, "int8", False, False, False, True, True, 0.12, 0.30, 0.003,
               "torchao Int8DynamicActivationInt8WeightConfig"),
        Scheme("nf4", "bitsandbytes", 0.5 + 4 / 64, "bf16", True, False, False, True, False, 0.36, 0.36, 0.026,
               "bitsandbytes Linear4bit, NF4, blocksize 64", streams=False, eager_overhead_s=25e-6),
    ]
}

BASELINE = "bf16"
COMPILED_OVERHEAD_S = 2e-6


def get(name: str) -> Scheme:
    if name not in CATALOG:
        raise SchemeError(f"unknown scheme {name!r}: choose one of {', '.join(CATALOG)}")
    return CATALOG[name]


# name -> fn(module, keep: set[str] of qualified Linear names to leave alone) -> None (in place)
ApplyFn = Callable[[torch.nn.Module, set], None]
_REGISTRY: dict[str, ApplyFn] = {}


def register(name: str) -> Callable[[ApplyFn], ApplyFn]:
    get(name)

    def deco(fn: ApplyFn) -> ApplyFn:
        _REGISTRY[name] = fn
        return fn

    return deco


def apply_scheme(name: str, module: torch.nn.Module, keep: set) -> None:
    if name not in _REGISTRY:
        from . import quantize  # noqa: F401  (fills the registry)
    _REGISTRY[name](module, keep)
