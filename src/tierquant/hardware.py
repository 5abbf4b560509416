"""What a device can do: memory, bandwidths, dense throughputs, and which schemes it runs fast.

Figures are vendor datasheet numbers (dense, no sparsity) and are leads for the roofline model,
not measurements; on the running device the planner measures instead (see `calibrate.py`).
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

from .errors import HardwareError

GiB = 1024**3
MiB = 1024**2
TERA = 1e12


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: int
    bandwidth: float  # device memory, bytes/s
    host_link: float  # host <-> device, bytes/s (pinned memory, practical)
    bf16_flops: float  # dense matrix throughput, FLOP/s
    fp8_flops: float  # 0 where the device has no FP8 tensor cores
    int8_ops: float
    capability: tuple[int, int] | None = None  # CUDA compute capability; None for CPU
    device: str = "cuda"  # "cuda" or "cpu"

    @property
    def has_fp8(self) -> bool:
        # FP8 tensor cores arrived with Ada (sm_89) and Hopper (sm_90).
        return self.capability is not None and self.capability >= (8, 9)

    def fast_schemes(self) -> list[str]:
        """Schemes whose matmuls run on this device's tensor cores at their own rate (weight-only
        schemes run anywhere, at the bf16 rate, after dequantizing)."""
        from .schemes import CATALOG

        rate = {"bf16": self.bf16_flops, "fp8": self.fp8_flops if self.has_fp8 else 0, "int8": self.int8_ops}
        return [s.name for s in CATALOG.values() if not s.available_on(self) and rate[s.math] > 0]

    @property
    def ridge_point(self) -> float:
        """Arithmetic intensity (FLOP/byte) above which bf16 work is compute-bound."""
        return self.bf16_flops / self.bandwidth

    def to_dict(self) -> dict:
        d = asdict(self)
        d["capability"] = list(self.capability) if self.capability else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Hardware":
        d = dict(d)
        d["capability"] = tuple(d["capability"]) if d.get("capability") else None
        return cls(**d)


def _gpu(name, mem_mib, bw_gbs, link_gbs, bf16_tf, fp8_tf, int8_tops, cc):
    return Hardware(name, mem_mib * MiB, bw_gbs * 1e9, link_gbs * 1e9, bf16_tf * TERA, fp8_tf * TERA,
                    int8_tops * TERA, cc)


# Memory is what torch.cuda reports as total on each card (MiB). Throughputs are dense tensor-core
# figures: bf16 with FP32 accumulation; FP8 at the rate torchao gets, which for row-wise dynamic FP8
# is `_scaled_mm` with fast accumulation (torchao's default), i.e. GeForce cards' FP16-accumulate
# rate (twice their FP32-accumulate rate). Sources: NVIDIA Ampere GA102 whitepaper (RTX 3090), NVIDIA Ada
# Lovelace whitepaper v1.1 (RTX 4070/4080/4090), NVIDIA RTX Blackwell whitepaper (RTX 5090), the
# L4, L40S, A100 and H100/H200 datasheets. Host link: practical pinned-memory copy rates for PCIe
# 4.0 x16 (~25 GB/s) and PCIe 5.0 x16 (~50 GB/s; 51.6 GB/s measured on an H200, docs/measurements.md).
TARGETS: dict[str, Hardware] = {
    h.name: h
    for h in [
        _gpu("rtx3090", 24576, 936, 25, 71, 0, 284, (8, 6)),
        _gpu("rtx4070", 12282, 504, 25, 58.3, 233.2, 233.2, (8, 9)),
        _gpu("rtx4080", 16376, 716.8, 25, 97.5, 389.9, 389.9, (8, 9)),
        _gpu("rtx4090", 24564, 1008, 25, 165.2, 660.6, 660.6, (8, 9)),
        _gpu("rtx5090", 32607, 1792, 50, 209.5, 838, 838, (12, 0)),
        _gpu("l4", 23034, 300, 25, 121, 242, 242, (8, 9)),
        _gpu("l40s", 46068, 864, 25, 362, 733, 733, (8, 9)),
        _gpu("a100-40gb", 40536, 1555, 25, 312, 0, 624, (8, 0)),
        _gpu("a100-80gb", 81251, 2039, 25, 312, 0, 624, (8, 0)),
        _gpu("h100", 81559, 3350, 50, 989, 1979, 1979, (9, 0)),
        _gpu("h200", 143771, 4800, 50, 989, 1979, 1979, (9, 0)),
        # A CPU "device": main memory is both host and device, so nothing is ever transferred.
        Hardware("cpu", 0, 20e9, float("inf"), 0.5 * TERA, 0, 0.5 * TERA, None, "cpu"),
    ]
}

# Memory a CUDA context and allocator fragmentation take from a card that torch cannot use for
# tensors; subtracted when a budget asks for the whole card.
CONTEXT_RESERVE = 512 * MiB


def target(name: str) -> Hardware:
    key = name.strip().lower().replace("_", "-")
    if key not in TARGETS:
        raise HardwareError(f"unknown target {name!r}: choose one of {', '.join(TARGETS)}")
    return TARGETS[key]


def _system_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 * GiB


def detect() -> Hardware:
    """The running device: the first CUDA GPU, matched to the table by name, or the CPU."""
    import torch

    if not torch.cuda.is_available():
        return Hardware(**{**TARGETS["cpu"].to_dict(), "memory_bytes": _system_memory(), "capability": None})
    props = torch.cuda.get_device_properties(0)
    cc = (props.major, props.minor)
    name = props.name.lower()
    for key, pattern in [("h200", r"h200"), ("h100", r"h100"), ("a100-80gb", r"a100.*80"),
                         ("a100-40gb", r"a100"), ("l40s", r"l40s"), ("l4", r"\bl4\b"), ("rtx5090", r"5090"),
                         ("rtx4090", r"4090"), ("rtx4080", r"4080"), ("rtx4070", r"4070"), ("rtx3090", r"3090")]:
        if re.search(pattern, name):
            base = TARGETS[key]
            return Hardware(**{**base.to_dict(), "name": key, "memory_bytes": props.total_memory, "capability": cc})
    # An unknown card: scale an A100-class roofline by its multiprocessor count, honestly labelled.
    raise HardwareError(
        f"unknown GPU {props.name!r} (compute capability {cc[0]}.{cc[1]}): pass --target with the closest of "
        f"{', '.join(TARGETS)} so the planner has its throughputs")


def resolve(target: "str | Hardware | None") -> Hardware:
    """A Hardware for `target`: itself, a TARGETS name, or (None) the running device."""
    if isinstance(target, Hardware):
        return target
    return globals()["target"](target) if target else detect()


def device_label() -> str:
    """Which physical device this process runs on, precise enough that figures measured on one
    are never taken for another's: "cuda:NVIDIA H200", "cpu:AMD EPYC 7R13 Processor x2"."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    import platform

    return f"cpu:{model or platform.processor() or platform.machine()} x{os.cpu_count()}"


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 1024, "mib": MiB, "gib": GiB, "tib": 1024**4}


def parse_budget(budget: str | int | float) -> int:
    """'24GiB', '16GB', '12000MiB', '1.5 GiB' or a number of bytes -> bytes."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        if budget <= 0:
            raise HardwareError(f"budget must be positive, got {budget}")
        return int(budget)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(budget))
    if not m or m.group(2).lower() not in _UNITS:
        raise HardwareError(f"cannot read budget {budget!r}: write it like 24GiB, 16GB, 12000MiB or a number of bytes")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise HardwareError(f"budget must be positive, got {budget!r}")
    return int(value)


def usable_budget(budget_bytes: int, hw: Hardware) -> int:
    """The bytes a plan may use: the budget, less the context reserve when it asks for the whole card."""
    if hw.device == "cpu" or not hw.memory_bytes:
        return budget_bytes
    return min(budget_bytes, hw.memory_bytes - CONTEXT_RESERVE)


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"
