"""Context parallelism's cost: one component (the denoiser) split by sequence over k identical cards,
as diffusers runs it (`ContextParallelConfig`, `ModelMixin.enable_parallelism`). Pure: plain data in,
numbers out; `devices.py` weighs it against placing components on cards of their own.

What the model assumes, per call of the component on each of the k cards:
- Weights are replicated: every card holds and reads all of them (the memory floor does not shrink).
- Work splits by tokens: FLOPs and the activation peak are 1/k of the whole (`shard`). Smaller
  matmuls fill fewer of the card's SMs: the share of the card a layer's 128x128 output tiles keep
  busy in their last wave (`wave_factor`) is charged against the whole call's, layer by layer.
- Communication is not overlapped with compute (diffusers' Ulysses waits for each all-to-all; its
  ring all-gathers K and V before its loop):
  - ulysses: per attention, all-to-alls of q, k, v and the output, each card sending (k-1)/k of its
    1/k of the tokens: 4 x T/k x width x 2 B x (k-1)/k; plus the reshapes around them, 2 passes over
    each tensor in device memory.
  - ring: per attention, one all-gather of K and V (each card receives (k-1) chunks of T/k tokens:
    2 x T/k x width x 2 B x (k-1)), then k partial attentions merged in fp32 (3 passes over a 4-byte
    output chunk per step).
  - per call, the output is gathered once (one all-gather of the last layer's output).
  Each collective also costs a fixed latency (`COLLECTIVE_LATENCY_S`), and each ring step a fixed
  cost (`RING_STEP_S`: a partial attention's launch and its merge). Both are assumptions, checked
  against xDiT's published Flux.1-dev figures on 4 H100s at 1024x1024, 28 steps, bf16 compiled
  (xdit-project/xDiT docs/performance/flux.md: 1 GPU 4.30 s, Ulysses-2 2.68, Ring-2 2.60, Ulysses-4
  1.63, Ring-4 1.98): with 40 us and 30 us this model predicts the transformer's call at 0.67, 0.65,
  0.41 and 0.45 of one card's for those four (measured, whole generations: 0.62, 0.60, 0.38, 0.46).
  Those figures fit a collective latency from about 20 us (0.63, 0.64, 0.38, 0.44) to 40 us; 40 us is
  the cautious end. At 256x256 the choice turns on it: with four H100s, Ulysses-4 costs 1.14 of one
  card's call at 40 us and 0.84 at 20 us (docs/devices.md).
- Tokens and widths come from the profile: each attention's query projections (`to_q`, and
  `add_q_proj` for the text stream of a joint attention; `q_proj`, `q` in transformers' models): their
  rows per call are the attention's tokens, their output width its hidden size. So the cost follows
  the resolution the profile was made at.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .hardware import SM_COUNTS, Hardware
from .profile import ComponentProfile

KINDS = ("ulysses", "ring")
DEGREES = (2, 4, 8)
COLLECTIVE_LATENCY_S = {"nvlink": 40e-6, "pcie": 80e-6}
RING_STEP_S = 30e-6  # one partial attention's launch and its merge's (a handful of small kernels)
TILE = 128  # output tile side of a tensor-core matmul (cuBLAS and CUTLASS's common 128x128)
BF16 = 2
_QUERY = ("to_q", "add_q_proj", "q_proj", "q")


@dataclass(frozen=True)
class Attention:
    """One attention of a component: its tokens per call and its hidden width."""

    name: str
    tokens: float
    width: int


def attentions(c: ComponentProfile) -> list[Attention]:
    """The component's attentions, from its query projections grouped by their module."""
    found: dict[str, list] = {}
    for l in c.layers:
        prefix, _, last = l.name.rpartition(".")
        if last in _QUERY and l.rows_per_call:
            a = found.setdefault(prefix, [0.0, 0])
            a[0] += l.rows_per_call
            a[1] = max(a[1], l.out_features)
    return [Attention(n, t, w) for n, (t, w) in found.items()]


def why_not(c: ComponentProfile, kind: str, k: int) -> str | None:
    """Why `c` cannot run context-parallel as `kind` over `k` cards; None if it can."""
    if not c.scales_with_steps:
        return "it is not called at every denoising step"
    if not attentions(c):
        return "the profile shows no attention (no query projections) to split"
    if kind == "ulysses":
        if not c.attention_heads:
            return "the profile does not record its attention heads (Ulysses splits them)"
        if c.attention_heads % k:
            return f"its {c.attention_heads} attention heads do not divide by {k}"
    for a in attentions(c):
        if a.tokens % k:  # diffusers splits every sequence evenly (its *_anything modes pad: not modelled)
            return f"{a.name}'s {a.tokens:.0f} tokens do not divide by {k}"
    return None


def shard(c: ComponentProfile, k: int, hw: Hardware) -> ComponentProfile:
    """What one of k cards computes per call: 1/k of the work and activations, all of the weights.
    The FLOPs are raised by the wave factor, so that the roofline prices the smaller matmuls' lower
    occupancy."""
    f = wave_factor(c, k, hw)
    return replace(c, flops_per_call=c.flops_per_call / k * f, linear_flops_per_call=c.linear_flops_per_call / k * f,
                   activation_peak_bytes=math.ceil(c.activation_peak_bytes / k),
                   layers=[replace(l, rows_per_call=l.rows_per_call / k) for l in c.layers])


def _occupancy(rows: float, cols: int, sms: int) -> float:
    tiles = math.ceil(rows / TILE) * math.ceil(cols / TILE)
    return tiles / (math.ceil(tiles / sms) * sms) if tiles else 1.0


def wave_factor(c: ComponentProfile, k: int, hw: Hardware) -> float:
    """How much longer the Linear work takes per FLOP with 1/k of the rows, from the SMs each layer's
    output tiles keep busy (1.0 for a card whose SM count is not in the table)."""
    sms = SM_COUNTS.get(hw.name)
    if not sms:
        return 1.0
    full = split = 0.0
    for l in c.layers:
        if l.rows_per_call <= 0:
            continue
        work = l.rows_per_call * l.in_features * l.out_features
        full += work / _occupancy(l.rows_per_call, l.out_features, sms)
        split += work / _occupancy(l.rows_per_call / k, l.out_features, sms)
    return split / full if full else 1.0


def comm_seconds(c: ComponentProfile, kind: str, k: int, hw: Hardware) -> float:
    """Seconds per call each card spends communicating (not hidden behind compute)."""
    link = hw.card_link
    latency = COLLECTIVE_LATENCY_S.get(hw.link_kind, COLLECTIVE_LATENCY_S["pcie"])
    sent = moved = 0.0  # bytes over the link per card; bytes through device memory
    collectives = 1  # the output's all-gather
    extra = 0.0
    for a in attentions(c):
        chunk = a.tokens / k * a.width * BF16
        if kind == "ulysses":
            sent += 4 * chunk * (k - 1) / k
            moved += 2 * 4 * chunk
            collectives += 4
        else:
            sent += 2 * chunk * (k - 1)
            moved += k * 3 * (a.tokens / k * a.width * 4)
            collectives += 1
            extra += k * RING_STEP_S
    last = c.layers[-1] if c.layers else None
    if last is not None:
        sent += last.rows_per_call / k * last.out_features * BF16 * (k - 1)
    return sent / link + moved / hw.bandwidth + collectives * latency + extra


def config_kwargs(parallel: dict) -> dict:
    """diffusers' ContextParallelConfig arguments for a plan's `parallel`."""
    return {f"{parallel['kind']}_degree": int(parallel["degree"])}
