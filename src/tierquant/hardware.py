"""What a device can do: memory, bandwidths, dense throughputs, and which schemes it runs fast.

Figures are vendor datasheet numbers (dense, no sparsity) and are leads for the roofline model,
not measurements; on the running device the planner measures instead (see `calibrate.py`).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, replace

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
    # Between two cards of this kind in one machine (LINKS): bytes/s one way, and "nvlink" or "pcie".
    # 0: not known (an unlisted card, a plan file from before), read as the host link (`card_link`).
    peer_link: float = 0.0
    link_kind: str = "pcie"

    @property
    def card_link(self) -> float:
        """Bytes/s from this card to another of its kind: the peer link, else the host link."""
        return self.peer_link or self.host_link

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
#
# The second group (issue 12) is from datasheets too, with memory at its nominal size in MiB where no
# torch figure was at hand (the budget check allows up to the next whole GiB, so that is harmless):
# - t4: NVIDIA T4 datasheet (65 TFLOPS FP16 tensor, 130 INT8 TOPS, 320 GB/s, PCIe 3.0 x16 ~12 GB/s).
#   Turing has no bf16 tensor cores: its FP16 rate stands in for bf16. Memory: what Colab's T4 reports.
# - a10: NVIDIA A10 datasheet (125 TFLOPS BF16 dense, 250 INT8 TOPS, 600 GB/s). a10g (AWS G5): NVIDIA
#   publishes no datasheet; 70 TFLOPS BF16 / 140 INT8 TOPS as AWS and Baseten ("A10 vs A10G") report it,
#   same memory and bandwidth. Both at the 23028 MiB nvidia-smi shows with ECC on.
# - l40: NVIDIA L40 datasheet (181 TFLOPS BF16 dense, 362 FP8 and INT8, 864 GB/s; ECC on, as the L40S).
# - rtx-a6000: NVIDIA RTX A6000 datasheet (309.7 TFLOPS tensor with sparsity -> 154.8 dense, 768 GB/s).
# - rtx6000-ada: NVIDIA RTX 6000 Ada datasheet (1457 FP8 TFLOPS with sparsity -> 728.5 dense; bf16 half
#   of it; 960 GB/s).
# - b200: NVIDIA HGX B200 datasheet, per GPU (2.25 PFLOPS BF16 dense, 4.5 FP8 and INT8, 7.7 TB/s,
#   180 GB; 183359 MiB as nvidia-smi reports it).
# - GeForce cards the whitepapers do not tabulate (RTX 3080, 4060 Ti 16GB, 4070 Ti Super, 4080 Super,
#   5070 Ti, 5080): SMs x boost clock (NVIDIA's spec pages) x the per-SM rate of the whitepaper cards of
#   the same architecture: 512 dense bf16 FLOP per clock with FP32 accumulate, 4x that for FP8 with FP16
#   accumulate and INT8 (e.g. 4090: 128 SMs x 2.52 GHz x 512 = 165.2 TFLOPS). The 4060 Ti is PCIe 4.0 x8.
TARGETS: dict[str, Hardware] = {
    h.name: h
    for h in [
        _gpu("rtx3080", 10240, 760, 25, 59.5, 0, 238, (8, 6)),
        _gpu("rtx3090", 24576, 936, 25, 71, 0, 284, (8, 6)),
        _gpu("rtx4060ti-16gb", 16384, 288, 12.5, 44.1, 176.5, 176.5, (8, 9)),
        _gpu("rtx4070", 12282, 504, 25, 58.3, 233.2, 233.2, (8, 9)),
        _gpu("rtx4070ti-super", 16384, 672, 25, 88.2, 352.7, 352.7, (8, 9)),
        _gpu("rtx4080", 16376, 716.8, 25, 97.5, 389.9, 389.9, (8, 9)),
        _gpu("rtx4080-super", 16384, 736, 25, 104.4, 417.8, 417.8, (8, 9)),
        _gpu("rtx4090", 24564, 1008, 25, 165.2, 660.6, 660.6, (8, 9)),
        _gpu("rtx5070ti", 16384, 896, 50, 87.9, 351.5, 351.5, (12, 0)),
        _gpu("rtx5080", 16384, 960, 50, 112.6, 450.2, 450.2, (12, 0)),
        _gpu("rtx5090", 32607, 1792, 50, 209.5, 838, 838, (12, 0)),
        _gpu("rtx-a6000", 49140, 768, 25, 154.8, 0, 309.7, (8, 6)),
        _gpu("rtx6000-ada", 49140, 960, 25, 364.2, 728.5, 728.5, (8, 9)),
        _gpu("t4", 15095, 320, 12, 65, 0, 130, (7, 5)),
        _gpu("a10", 23028, 600, 25, 125, 0, 250, (8, 6)),
        _gpu("a10g", 23028, 600, 25, 70, 0, 140, (8, 6)),
        _gpu("l4", 23034, 300, 25, 121, 242, 242, (8, 9)),
        _gpu("l40", 46068, 864, 25, 181, 362, 362, (8, 9)),
        _gpu("l40s", 46068, 864, 25, 362, 733, 733, (8, 9)),
        _gpu("a100-40gb", 40536, 1555, 25, 312, 0, 624, (8, 0)),
        _gpu("a100-80gb", 81251, 2039, 25, 312, 0, 624, (8, 0)),
        _gpu("h100", 81559, 3350, 50, 989, 1979, 1979, (9, 0)),
        _gpu("h200", 143771, 4800, 50, 989, 1979, 1979, (9, 0)),
        _gpu("b200", 183359, 7700, 50, 2250, 4500, 4500, (10, 0)),
        # A CPU "device": main memory is both host and device, so nothing is ever transferred.
        Hardware("cpu", 0, 20e9, float("inf"), 0.5 * TERA, 0, 0.5 * TERA, None, "cpu"),
    ]
}

# Streaming multiprocessors per card (whitepapers, datasheets): what an unlisted card's throughputs
# are scaled by, from the listed card of its architecture closest in size.
SM_COUNTS: dict[str, int] = {
    "rtx3080": 68, "rtx3090": 82, "rtx4060ti-16gb": 34, "rtx4070": 46, "rtx4070ti-super": 66, "rtx4080": 76,
    "rtx4080-super": 80, "rtx4090": 128, "rtx5070ti": 70, "rtx5080": 84, "rtx5090": 170, "rtx-a6000": 84,
    "rtx6000-ada": 142, "t4": 40, "a10": 72, "a10g": 80, "l4": 58, "l40": 142, "l40s": 142, "a100-40gb": 108,
    "a100-80gb": 108, "h100": 132, "h200": 132, "b200": 148,
}
# GeForce cards run bf16 with FP32 accumulate at half the rate of the data-center and workstation
# cards of the same chip: an unlisted card is scaled from one of its own kind where there is one.
GEFORCE = {"rtx3080", "rtx3090", "rtx4060ti-16gb", "rtx4070", "rtx4070ti-super", "rtx4080", "rtx4080-super",
           "rtx4090", "rtx5070ti", "rtx5080", "rtx5090"}

# The link between two cards of a kind in one machine, one direction: (kind, GB/s). What a copy of
# activations from one card to another, and context parallelism's collectives, run over.
# - NVLink (SXM boards): H100 / H200 NVLink 4, 900 GB/s bidirectional -> 450 one way; A100 NVLink 3,
#   600 -> 300; B200 NVLink 5, 1.8 TB/s -> 900 (NVIDIA H100, H200, A100 and HGX B200 datasheets). These
#   are the SXM parts: the table's h100 / h200 / a100 rows are (their memory bandwidths are SXM's).
# - PCIe, data-center and workstation cards: peer-to-peer at the practical PCIe rate, the host link's.
# - GeForce cards: NVIDIA disables peer-to-peer on GeForce since Ada (and most boards share the CPU's
#   lanes), so a copy goes through host memory: down one link and up the other, taken as half the host
#   link. An assumption, not measured here.
LINKS: dict[str, tuple[str, float]] = {
    "a100-40gb": ("nvlink", 300), "a100-80gb": ("nvlink", 300), "h100": ("nvlink", 450),
    "h200": ("nvlink", 450), "b200": ("nvlink", 900),
}
TARGETS = {n: h if h.device == "cpu" else replace(
    h, link_kind=LINKS.get(n, ("pcie", 0))[0],
    peer_link=LINKS[n][1] * 1e9 if n in LINKS else h.host_link / 2 if n in GEFORCE else h.host_link)
    for n, h in TARGETS.items()}

# Names as torch reports them (lowercase) -> table entry; the first match wins, so the more specific
# patterns come first ("4080 super" before "4080", "l40s" before "l40").
NAME_PATTERNS: list[tuple[str, str]] = [
    ("b200", r"\bb200\b"), ("h200", r"h200"), ("h100", r"h100"), ("a100-80gb", r"a100.*80"), ("a100-40gb", r"a100"),
    ("a10g", r"\ba10g\b"), ("a10", r"\ba10\b"), ("l40s", r"\bl40s\b"), ("l40", r"\bl40\b"), ("l4", r"\bl4\b"),
    ("t4", r"\bt4\b"), ("rtx6000-ada", r"rtx 6000 ada"), ("rtx-a6000", r"rtx a6000"),
    ("rtx5090", r"\b5090\b"), ("rtx5080", r"\b5080\b"), ("rtx5070ti", r"\b5070 ti\b"),
    ("rtx4090", r"\b4090\b"), ("rtx4080-super", r"\b4080 super\b"), ("rtx4080", r"\b4080\b"),
    ("rtx4070ti-super", r"\b4070 ti super\b"), ("rtx4070", r"\b4070\b(?! ti| super)"),
    ("rtx4060ti-16gb", r"\b4060 ti\b"), ("rtx3090", r"\b3090\b(?! ti)"), ("rtx3080", r"\b3080\b(?! ti)"),
]


class HardwareWarning(UserWarning):
    """Planning goes on, but on figures that are estimates (an unlisted card)."""


# Memory a CUDA context and allocator fragmentation take from a card that torch cannot use for
# tensors; subtracted when a budget asks for the whole card.
CONTEXT_RESERVE = 512 * MiB


def _squash(name: str) -> str:
    return re.sub(r"[\s_-]+", "", name.strip().lower())


def target(name: str) -> Hardware:
    """A TARGETS entry by name; case, spaces, '-' and '_' do not matter ('RTX 4080 Super')."""
    found = {_squash(k): h for k, h in TARGETS.items()}.get(_squash(name))
    if found is None:
        raise HardwareError(f"unknown target {name!r}: choose one of {', '.join(TARGETS)} "
                            f"(`tierquant list` shows their memory and FP8 support)")
    return found


def _system_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 * GiB


def detect(device: str | None = None) -> Hardware:
    """The running device: the first CUDA GPU (see `from_properties`), or the CPU (also where
    `device` is "cpu": work held there runs the CPU's kernels on a GPU machine too)."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return Hardware(**{**TARGETS["cpu"].to_dict(), "memory_bytes": _system_memory(), "capability": None})
    return from_properties(torch.cuda.get_device_properties(0))


def detect_cards() -> list[Hardware]:
    """Every CUDA GPU torch sees, in its order (none without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [from_properties(torch.cuda.get_device_properties(i)) for i in range(torch.cuda.device_count())]


def from_properties(props) -> Hardware:
    """A Hardware for a GPU from its torch device properties (name, total_memory, major, minor,
    multi_processor_count): the table's entry matched by name, with the card's own memory; else, for
    an unlisted card, the listed card of the same architecture (compute capability) closest in SM
    count, its throughputs scaled by the SM ratio, named "unlisted:<name> (scaled from <entry>)",
    with a HardwareWarning."""
    cc = (props.major, props.minor)
    name = props.name.lower()
    for key, pattern in NAME_PATTERNS:
        if re.search(pattern, name):
            base = TARGETS[key]
            return Hardware(**{**base.to_dict(), "name": key, "memory_bytes": props.total_memory, "capability": cc})
    return _scaled(props, cc)


def _scaled(props, cc: tuple[int, int]) -> Hardware:
    import warnings

    sms = getattr(props, "multi_processor_count", None) or 0
    listed = [k for k in SM_COUNTS if TARGETS[k].capability == cc] or \
             [k for k in SM_COUNTS if TARGETS[k].capability and TARGETS[k].capability[0] == cc[0]]
    if not listed or sms <= 0:
        raise HardwareError(
            f"unknown GPU {props.name!r} (compute capability {cc[0]}.{cc[1]}), and no listed card of its "
            f"architecture to scale from: pass --target with the closest of {', '.join(TARGETS)} "
            f"so the planner has its throughputs")
    geforce = "geforce" in props.name.lower()
    same_kind = [k for k in listed if (k in GEFORCE) == geforce] or listed
    ref = min(same_kind, key=lambda k: (abs(math.log(SM_COUNTS[k] / sms)), k))
    base, f = TARGETS[ref], sms / SM_COUNTS[ref]
    hw = Hardware(name=f"unlisted:{props.name} (scaled from {ref})", memory_bytes=int(props.total_memory),
                  bandwidth=base.bandwidth, host_link=base.host_link, bf16_flops=base.bf16_flops * f,
                  fp8_flops=base.fp8_flops * f, int8_ops=base.int8_ops * f, capability=cc)
    warnings.warn(HardwareWarning(
        f"{props.name} is not in tierquant's table: planning with {ref}'s figures scaled by its SM count "
        f"({sms} vs {SM_COUNTS[ref]}; memory bandwidth taken as {ref}'s). Predicted times are estimates; "
        f"on this device the planner measures layer times where it can."), stacklevel=3)
    return hw


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


_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 1024, "mib": MiB, "gib": GiB, "tib": 1024**4}


def parse_budget(budget: str | int | float) -> int:
    """'24GiB', '16GB', '12000MiB', '1.5 GiB' -> bytes. A Python number is a number of bytes
    (tierquant.plan(..., budget=24 * 2**30)); a string needs its unit: '24' is refused, since 24
    bytes is never what was meant. GiB = 1024^3 bytes, GB = 10^9."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        if not math.isfinite(budget) or budget <= 0:
            raise HardwareError(f"budget must be a positive number of bytes, got {budget}")
        return int(budget)
    text = str(budget).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)", text)
    if m and not m.group(2):
        raise HardwareError(f"budget {text!r} has no unit: write {m.group(1)}GiB (GiB = 1024^3 bytes) "
                            f"or {m.group(1)}GB (10^9)")
    if not m or m.group(2).lower() not in _UNITS:
        raise HardwareError(f"cannot read budget {budget!r}: write it like 24GiB, 16GB or 12000MiB "
                            f"(GiB = 1024^3 bytes, GB = 10^9)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise HardwareError(f"budget must be positive, got {budget!r}")
    return int(value)


def check_budget(budget_bytes: int, hw: Hardware) -> None:
    """Refuse a budget larger than a GPU's memory. The card's memory is rounded up to a whole GiB
    first, so that asking for the whole card ('24GiB' on a card that reports 23.99 GiB) is allowed;
    `usable_budget` then takes the CUDA context off. CPUs (memory 0 in the table) are not checked."""
    if hw.device != "cuda" or not hw.memory_bytes:
        return
    whole = math.ceil(hw.memory_bytes / GiB)
    if budget_bytes > whole * GiB:
        from .fmt import human_budget

        raise HardwareError(f"budget {human_budget(budget_bytes)} is more than the {hw.name} has: "
                            f"{gib(hw.memory_bytes)} of memory. Give at most {whole}GiB (the whole card), "
                            f"or plan for a larger --target")


def usable_budget(budget_bytes: int, hw: Hardware) -> int:
    """The bytes a plan may use: the budget, less the context reserve when it asks for the whole card."""
    if hw.device == "cpu" or not hw.memory_bytes:
        return budget_bytes
    return min(budget_bytes, hw.memory_bytes - CONTEXT_RESERVE)


def gib(n: float) -> str:
    """A size for messages: two decimals of GiB from 1 GiB up ('22.88 GiB'), smaller ones in MiB, KiB
    or B with three significant digits ('461 MiB'): never '0.00 GiB'."""
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    from .fmt import human_bytes

    return human_bytes(n)
