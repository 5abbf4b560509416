"""The scheme catalog: what each quantization scheme costs, needs and composes with. Plain data.

The planner reasons with these rows alone; the code that applies a scheme is its entry in
`backends.py`. Adding a scheme is one row here and one entry there (docs/schemes.md).
Importable without torch or any backend library.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import SchemeError


@dataclass(frozen=True, kw_only=True)
class Scheme:
    name: str
    backend: str  # "torch" | "torchao" | "bitsandbytes": the library that does the work
    bytes_per_param: float  # for the quantized linear weights (nf4: its absmax per 64 weights included)
    # Per output row of a quantized Linear: its scale and zero point. Measured on torchao 0.18's
    # tensors: fp8 one fp32 scale (4), int8 an fp32 scale and an int8 zero point (5). For Flux's
    # FP8 blocks that is 0.09% of their bytes, which a plan's host memory missed (docs/frontier.md).
    bytes_per_row: float = 0.0
    math: str  # "bf16" | "fp8" | "int8": the tensor-core rate the matmuls run at
    weight_only: bool
    needs_fp8: bool = False  # needs FP8 tensor cores (compute capability >= 8.9)
    needs_cuda: bool = False
    composes_with_offload: bool = True  # survives being moved between host and device
    composes_with_compile: bool = True  # torch.compile traces it (regional compile)
    # Fraction of the `math` peak that a component's Linear work reaches, eager and regionally
    # compiled (the rest of its FLOPs run at bf16's: `cost.compute_seconds`). Priors from one H200 run
    # of the Flux transformer (docs/measurements.md): bf16 0.173 s eager / 0.133 compiled; fp8-dynamic
    # 0.269 / 0.0997; int8-weight 0.234, fp8-weight 0.276, nf4 0.208 eager; 74.4 TFLOP per step. The
    # roofline gives each within 5% of its source (tests/test_priors.py). Where no compiled run exists,
    # compile is assumed to gain what it gained for bf16 (1.3x).
    efficiency_eager: float
    efficiency_compiled: float
    # Prior relative output error of one quantized component, used by `tolerance` until a measured
    # sensitivity exists: 1 - cosine of all-MiniLM-L6-v2 token embeddings on CPU (docs/measurements.md).
    error_prior: float
    # Host-side time of one eager Linear call on a GPU: launches, and for torchao / bitsandbytes the
    # Python dispatch of their tensor types (fp8-dynamic quantizes each activation in a dozen small
    # ops). The GPU computes while the host issues the next calls, so a call costs the longer of the
    # two (`cost.roofline_call_seconds`); small layers are bound by it. The floor of the layer times
    # measured on an H100 host on 2026-12-06 (docs/measurements.md), where a call's own work is
    # microseconds: bf16 28-30 us, fp8-dynamic 400-450, int8-dynamic 1100-1800, fp8-weight ~100,
    # int8-weight ~85, nf4 ~60. Compiled regions pay COMPILED_OVERHEAD_S per layer.
    eager_overhead_s: float = 85e-6
    # Layer shapes it can pack: in_features and out_features must be multiples of these.
    # bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a Linear4bit's weight at its first
    # eval-mode call: one absmax per 64 input features of each output row, output rows in tiles of
    # 32. Other shapes fail there ("shape '[128, 1]' is invalid for input of size 192"; measured for
    # in_features 64..384 x out_features 64..3073). Applied on every device, so that a plan means
    # the same layers everywhere.
    in_multiple: int = 1
    out_multiple: int = 1
    # Seconds to compile one block variant (a block class, mostly) from a cold cache: Flux's two block
    # classes took 13 s in bf16 on an H200; in fp8-dynamic a cold first image spent 18 s more than a
    # later one (Flux, 2 variants) and 20 s (SD3.5-large, 2 variants) on an H100 (2026-11-26, with
    # torchao's process-wide autotuning off; with it on, Flux's cold compile took 161 s on an H200 and
    # its first images 88-318 s on an H100: docs/compile.md). The other
    # torchao schemes are not measured: assumed like fp8-dynamic. None: never compiled.
    compile_s: float | None = 10.0
    description: str = ""

    def packs(self, in_features: int, out_features: int) -> str | None:
        """None where the scheme can quantize a Linear of this shape, else why not."""
        if in_features % self.in_multiple:
            return f"{self.name} packs {self.in_multiple} input features per block; {in_features} does not divide"
        if out_features % self.out_multiple:
            return f"{self.name} packs output features in tiles of {self.out_multiple}; {out_features} does not divide"
        return None

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
        Scheme(name="bf16", backend="torch", bytes_per_param=2.0, math="bf16", weight_only=True,
               efficiency_eager=0.43, efficiency_compiled=0.57, error_prior=0.0, eager_overhead_s=30e-6, compile_s=6.5,
               description="no quantization"),
        # efficiency_compiled was 0.38, fitted while a call's every FLOP ran at the scheme's rate. With the
        # attention at bf16's it priced its source 7% slow, and the unlimited H100 runs of 2026-12-06 9%
        # (Flux) and 11% (SD3.5-large) slow per step; 0.415 gives them 0%, +2% and +4%.
        Scheme(name="fp8-dynamic", backend="torchao", bytes_per_param=1.0, bytes_per_row=4.0, math="fp8", weight_only=False,
               needs_fp8=True, needs_cuda=True, efficiency_eager=0.13, efficiency_compiled=0.415, error_prior=0.003,
               eager_overhead_s=400e-6,
               description="torchao Float8DynamicActivationFloat8WeightConfig, row-wise scales"),
        Scheme(name="fp8-weight", backend="torchao", bytes_per_param=1.0, bytes_per_row=4.0, math="bf16", weight_only=True,
               efficiency_eager=0.25, efficiency_compiled=0.35, error_prior=0.0015, eager_overhead_s=100e-6,
               description="torchao Float8WeightOnlyConfig"),
        Scheme(name="int8-weight", backend="torchao", bytes_per_param=1.0, bytes_per_row=5.0, math="bf16", weight_only=True,
               efficiency_eager=0.305, efficiency_compiled=0.42, error_prior=0.0005, eager_overhead_s=85e-6,
               description="torchao Int8WeightOnlyConfig"),
        # torch._int_mm writes int32 outputs that a second kernel rescales (4+4 extra bytes per output
        # element), where FP8 `_scaled_mm` rescales in its epilogue: a lower prior than fp8-dynamic.
        Scheme(name="int8-dynamic", backend="torchao", bytes_per_param=1.0, bytes_per_row=5.0, math="int8", weight_only=False,
               efficiency_eager=0.12, efficiency_compiled=0.30, error_prior=0.003, eager_overhead_s=1.2e-3,
               description="torchao Int8DynamicActivationInt8WeightConfig"),
        Scheme(name="nf4", backend="bitsandbytes", bytes_per_param=0.5 + 4 / 64, math="bf16", weight_only=True,
               composes_with_compile=False, compile_s=None, efficiency_eager=0.35, efficiency_compiled=0.35,
               error_prior=0.026, eager_overhead_s=60e-6, in_multiple=64, out_multiple=32,
               description="bitsandbytes Linear4bit, NF4, blocksize 64"),
    ]
}

BASELINE = "bf16"
COMPILED_OVERHEAD_S = 2e-6


def get(name: str) -> Scheme:
    if name not in CATALOG:
        raise SchemeError(f"unknown scheme {name!r}: choose one of {', '.join(CATALOG)}")
    return CATALOG[name]
