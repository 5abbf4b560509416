"""What one generation asks of each component: the Profile and its parts.

A Profile is plain data (JSON round-trip): the planner reads only this, never the pipeline.
`profiler.py` fills it by running a pipeline once with hooks on its components.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

# 2: per-block sizes (ComponentProfile.blocks) and default_steps; version 1 files load (blocks
# empty, default_steps None). 3: tiled decoding (ComponentProfile.tiled_*); older files load without it.
# 4: per-block FLOPs (ComponentProfile.block_flops); older files load without them.
PROFILE_VERSION = 4


@dataclass
class Layer:
    """One Linear layer of a component: what quantization acts on."""

    name: str  # qualified name inside the component
    in_features: int
    out_features: int
    rows_per_call: float  # activation rows (product of leading dims) per component call, summed over uses
    keep: str | None = None  # why it stays in high precision, or None when it may be quantized

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass
class ComponentProfile:
    name: str
    class_name: str
    params: int
    weight_bytes: int  # as profiled (bf16 for the built-ins)
    calls: int  # per generation, counting every entry point (forward, decode, encode, ...)
    methods: dict[str, int]  # entry point -> calls, e.g. {"decode": 1}
    flops_per_call: float
    linear_flops_per_call: float  # the part of flops_per_call that runs in Linear layers
    activation_peak_bytes: int  # above the weights, during one call
    phase: int  # index into Profile.phases
    seconds_per_call: float | None = None  # measured bf16 eager time; None where not measured
    layers: list[Layer] = field(default_factory=list)
    largest_block_bytes: int = 0  # biggest repeated block (or top-level child): what streaming holds at once
    repeated_blocks: list[str] = field(default_factory=list)  # class names compiled regionally
    scales_with_steps: bool = False  # called once per denoising step
    # [parameters, quantizable parameters] of each outermost repeated block, in call order: what
    # streams one block at a time, and what can stay resident when only part of the component fits.
    blocks: list[list[int]] = field(default_factory=list)
    # [FLOPs, of which in Linear layers] of each of those blocks per call: how the call's compute is
    # shared among them. A Flux double block holds 2.4x a single block's weights but computes only
    # 1.2x as much (each token goes through one of its two streams), so a share by weights put the
    # copies of streamed double blocks behind twice the compute they had. Empty: not measured
    # (profiles before version 4), shared by parameters.
    block_flops: list[list[float]] = field(default_factory=list)
    # Where the component can decode in tiles (activations.tiling_facts): its activation peak then,
    # and the work done relative to one untiled call (tiles overlap). None: it cannot.
    tiled_activation_peak_bytes: int | None = None
    tiled_work: float = 1.0
    # Attention heads (its config's num_attention_heads; 0: not known): what Ulysses context
    # parallelism splits across cards, so its degree must divide it.
    attention_heads: int = 0

    @property
    def block_params(self) -> int:
        return sum(p for p, _ in self.blocks)

    @property
    def quantizable_params(self) -> int:
        return sum(l.params for l in self.layers if l.keep is None)

    def intensity(self) -> float:
        """FLOP per byte of weights read, per call: high means compute-bound."""
        return self.flops_per_call / max(self.weight_bytes, 1)


@dataclass
class Phase:
    """A span of the generation: components whose calls interleave share one."""

    index: int
    components: list[str]

    @property
    def name(self) -> str:
        return "+".join(self.components)


@dataclass
class Profile:
    pipeline: str  # the pipeline's class name
    components: dict[str, ComponentProfile]
    phases: list[Phase]
    steps: int | None  # num_inference_steps the profile describes
    device: str  # where it was measured ("cuda:NVIDIA H100 80GB HBM3", "cpu", "meta")
    call_kwargs: dict = field(default_factory=dict)  # the JSON-able part of the call
    # Measured relative output error per component and scheme (quality.sensitivity); the planner
    # uses these where present and the schemes' priors otherwise.
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)
    # The pipeline's own num_inference_steps (its __call__'s default), where it has one: what it runs
    # when not told otherwise. A profile made with fewer steps (a short profiling run) is planned for
    # this many by tierquant.plan unless it is given `steps`.
    default_steps: int | None = None
    version: int = PROFILE_VERSION

    def fingerprint(self) -> dict:
        """What identifies the pipeline a plan is made for."""
        return {"class": self.pipeline,
                "components": {n: {"class": c.class_name, "params": c.params} for n, c in self.components.items()}}

    def scaled(self, steps: int) -> "Profile":
        """This profile for a run of `steps` denoising steps (per-step components scale, others don't)."""
        if not self.steps or steps == self.steps:
            return replace(self, steps=steps) if not self.steps else self
        comps = {}
        for n, c in self.components.items():
            if c.scales_with_steps:
                per_step = c.calls / self.steps
                calls = max(1, round(per_step * steps))
                methods = {m: max(1, round(k / self.steps * steps)) for m, k in c.methods.items()}
                comps[n] = replace(c, calls=calls, methods=methods)
            else:
                comps[n] = c
        kwargs = {**self.call_kwargs}
        if "num_inference_steps" in kwargs:
            kwargs["num_inference_steps"] = steps
        return replace(self, components=comps, steps=steps, call_kwargs=kwargs)

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        comps = {}
        for n, c in d["components"].items():
            c = dict(c)
            c["layers"] = [Layer(**l) for l in c.get("layers", [])]
            comps[n] = ComponentProfile(**c)
        return cls(pipeline=d["pipeline"], components=comps, phases=[Phase(**p) for p in d["phases"]],
                   steps=d.get("steps"), device=d.get("device", "?"), call_kwargs=d.get("call_kwargs", {}),
                   sensitivity=d.get("sensitivity", {}), default_steps=d.get("default_steps"),
                   version=d.get("version", PROFILE_VERSION))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        return cls.from_dict(json.loads(Path(path).read_text()))


def phases_from_calls(order: list[str]) -> tuple[list[Phase], dict[str, int]]:
    """Group components into phases from the order of their calls alone.

    Each component spans [first call, last call]; components whose spans overlap (CFG's
    prompt/negative-prompt encoders, say) share a phase. Phases come out in generation order.
    """
    span: dict[str, list[int]] = {}
    for i, name in enumerate(order):
        span.setdefault(name, [i, i])[1] = i
    phases: list[Phase] = []
    end = -1
    for name in sorted(span, key=lambda n: span[n][0]):
        first, last = span[name]
        if phases and first <= end:
            phases[-1].components.append(name)
            end = max(end, last)
        else:
            phases.append(Phase(len(phases), [name]))
            end = last
    of = {n: p.index for p in phases for n in p.components}
    return phases, of
