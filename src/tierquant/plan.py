"""A Plan: per component, a scheme, a placement and whether to compile; plus what it predicts.

Plans are versioned JSON files. Loading checks the file strictly, so that a damaged or foreign
file is refused with a message naming the file and what is wrong, never half-applied.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import PlanError
from .hardware import gib
from .schemes import CATALOG

PLAN_FORMAT = "tierquant-plan"
# 2: streamed components say how many blocks stay resident, and the prefetch depth. 3: plans over several
# cards: each component's `device`, the plan's `devices` and `parallel`. Older files read as one card.
# 4: a streamed component may list the blocks that stream (`Choice.streamed`); older files spread them evenly.
PLAN_VERSION = 4
READS = (1, 2, 3, 4)
PARALLEL_KINDS = ("ulysses", "ring")
PLACEMENTS = ("resident", "swapped", "streamed")


def streamed_blocks(n: int, resident: int | None) -> list[int]:
    """Which of a component's `n` blocks stream (their indices, in call order) when `resident` of them
    stay on the device: spread evenly, so that each streamed block's copy runs behind the compute of
    the resident blocks before it (all the streamed ones last, the copies would queue behind each
    other at the end of every call)."""
    m = n - min(max(resident or 0, 0), n)
    return [(j + 1) * n // m - 1 for j in range(m)] if m else []


def _flag(d: dict, key: str, bad) -> bool:
    v = d.get(key, False)
    if not isinstance(v, bool):
        raise bad(f"'{key}' must be true or false")
    return v


@dataclass
class Choice:
    scheme: str
    placement: str  # resident | swapped | streamed
    compile: bool
    predicted_seconds: float = 0.0  # this component's share of one generation
    weight_bytes: int = 0  # on the device while it is placed there
    expected_error: float = 0.0
    reason: str = ""
    rejected: dict | None = None  # best alternative: {"scheme", "placement", "compile", "why"}
    kept: dict[str, str] = field(default_factory=dict)  # layers left in high precision -> why
    # streamed: `resident_blocks` of its blocks stay on the device (None or 0: all stream; which ones:
    # `streamed_blocks`), the others are copied `prefetch` blocks ahead of the one computing.
    resident_blocks: int | None = None
    prefetch: int = 1
    # streamed: which blocks stream, by index in call order, where the planner spread them by compute
    # (`cost.spread_by_compute`); None: the `n - resident_blocks` of `streamed_blocks`, spread evenly.
    streamed: list[int] | None = None
    host_bytes: int = 0  # pinned host memory it needs (swapped: all its weights; streamed: the streamed blocks)
    tiled: bool = False  # decodes in tiles (activations.py): less activation memory, more work
    device: int = 0  # the card it computes on: an index into Plan.devices (0 on one card)

    def streamed_indices(self, n: int) -> list[int]:
        """The blocks that stream, of a component with `n` stream blocks."""
        return list(self.streamed) if self.streamed is not None else streamed_blocks(n, self.resident_blocks)


@dataclass
class Plan:
    components: dict[str, Choice]
    predicted_latency_s: float
    predicted_peak_bytes: int
    budget_bytes: int
    hardware: dict  # Hardware.to_dict()
    pipeline: dict  # Profile.fingerprint()
    phases: list[dict] = field(default_factory=list)  # [{"components": [...], "peak_bytes": int}]
    steps: int | None = None
    notes: list[str] = field(default_factory=list)
    # Host memory the plan itself needs: the pinned host copies of swapped and streamed components
    # (loading adds at most one component's bf16 weights while it is read).
    host_bytes: int = 0
    # Compiling the plan's compiled components: seconds from a cold cache, and with the caches of an
    # earlier process; and the images it was planned for (None: many).
    compile_s: float = 0.0
    compile_warm_s: float = 0.0
    images: int | None = None
    # Empty the allocator's cache when each phase starts (placement.PhaseSwitcher), so that no phase
    # carries the activations earlier phases left cached.
    free_between_phases: bool = False
    # Several cards: per card {"hardware", "budget_bytes", "peak_bytes", "components"} (empty: one card,
    # `hardware` and `budget_bytes` above); and context parallelism, if any, as
    # {"component", "kind" (ulysses | ring), "degree", "devices"}: the component runs on `degree` cards,
    # one process each, every card holding the whole plan (`Plan.rank_plan`).
    devices: list[dict] = field(default_factory=list)
    parallel: dict | None = None

    @property
    def multi_device(self) -> bool:
        return len(self.devices) > 1

    def rank_plan(self) -> "Plan":
        """The plan one card of a context-parallel plan applies: every component on it (device 0)."""
        from dataclasses import replace

        return replace(self, components={n: replace(c, device=0) for n, c in self.components.items()},
                       devices=[], parallel=None)

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "Plan":
        def bad(what: str) -> PlanError:
            return PlanError(f"{source} is not a usable tierquant plan: {what}")

        if not isinstance(d, dict):
            raise bad("the top level is not a JSON object")
        if d.get("format") != PLAN_FORMAT:
            raise bad(f"'format' is {d.get('format')!r}, expected {PLAN_FORMAT!r}")
        if d.get("version") not in READS:
            raise bad(f"version {d.get('version')!r} is not supported (this tierquant reads versions "
                      f"{', '.join(map(str, READS))})")
        for key in ("components", "predicted_latency_s", "predicted_peak_bytes", "budget_bytes", "hardware", "pipeline"):
            if key not in d:
                raise bad(f"missing '{key}'")
        if not isinstance(d["components"], dict) or not d["components"]:
            raise bad("'components' must be a non-empty object")
        comps = {}
        for name, c in d["components"].items():
            if not isinstance(c, dict):
                raise bad(f"component {name!r} is not an object")
            for key in ("scheme", "placement", "compile"):
                if key not in c:
                    raise bad(f"component {name!r} has no '{key}'")
            if c["scheme"] not in CATALOG:
                raise bad(f"component {name!r} has unknown scheme {c['scheme']!r} (known: {', '.join(CATALOG)})")
            if c["placement"] not in PLACEMENTS:
                raise bad(f"component {name!r} has unknown placement {c['placement']!r} (known: {', '.join(PLACEMENTS)})")
            if not isinstance(c["compile"], bool):
                raise bad(f"component {name!r}: 'compile' must be true or false")
            k, ahead = c.get("resident_blocks"), c.get("prefetch", 1)
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 0):
                raise bad(f"component {name!r}: 'resident_blocks' must be a whole number >= 0 or null")
            if not isinstance(ahead, int) or isinstance(ahead, bool) or ahead < 1:
                raise bad(f"component {name!r}: 'prefetch' must be a whole number >= 1")
            listed = c.get("streamed")
            if listed is not None and not (
                    isinstance(listed, list) and listed and c["placement"] == "streamed"
                    and all(isinstance(j, int) and not isinstance(j, bool) and j >= 0 for j in listed)
                    and listed == sorted(set(listed))):
                raise bad(f"component {name!r}: 'streamed' must be null or, for a streamed component, the "
                          f"indices of the blocks that stream: whole numbers >= 0, ascending, no repeats")
            if not isinstance(c.get("tiled", False), bool):
                raise bad(f"component {name!r}: 'tiled' must be true or false")
            dev = c.get("device", 0)
            if not isinstance(dev, int) or isinstance(dev, bool) or dev < 0 or dev >= max(1, len(d.get("devices") or [])):
                raise bad(f"component {name!r}: 'device' must be the index of one of the plan's "
                          f"{max(1, len(d.get('devices') or []))} device(s), got {dev!r}")
            try:
                comps[name] = Choice(**c)
            except TypeError as e:
                raise bad(f"component {name!r}: {e}") from None
        try:
            return cls(components=comps, predicted_latency_s=float(d["predicted_latency_s"]),
                       predicted_peak_bytes=int(d["predicted_peak_bytes"]), budget_bytes=int(d["budget_bytes"]),
                       hardware=dict(d["hardware"]), pipeline=dict(d["pipeline"]), phases=list(d.get("phases", [])),
                       steps=d.get("steps"), notes=list(d.get("notes", [])), host_bytes=int(d.get("host_bytes", 0)),
                       compile_s=float(d.get("compile_s", 0.0)), compile_warm_s=float(d.get("compile_warm_s", 0.0)),
                       images=d.get("images"), free_between_phases=_flag(d, "free_between_phases", bad),
                       devices=_devices(d.get("devices", []), bad), parallel=_parallel(d.get("parallel"), d, bad))
        except (TypeError, ValueError) as e:
            raise bad(str(e)) from None

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise PlanError(f"cannot read plan file {path}: {e.strerror or e}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{path} is not a usable tierquant plan: invalid JSON at line {e.lineno}: {e.msg}") from None
        return cls.from_dict(d, source=str(path))

    # -- display -------------------------------------------------------------------------
    def __str__(self) -> str:
        from .report import plan_text

        return plan_text(self)

    def summary(self) -> str:
        if self.multi_device:
            cards = ", ".join(f"{d['hardware'].get('name', '?')} {gib(d.get('peak_bytes', 0))} of {gib(d['budget_bytes'])}"
                              for d in self.devices)
            par = f", {self.parallel['component']} {self.parallel['kind']} x{self.parallel['degree']}" \
                if self.parallel else ""
            return (f"{self.pipeline.get('class', '?')} on {len(self.devices)} cards ({cards}{par}): "
                    f"{self.predicted_latency_s:.2f} s per generation, host memory {gib(self.host_bytes)}")
        return (f"{self.pipeline.get('class', '?')} on {self.hardware.get('name', '?')}: "
                f"{self.predicted_latency_s:.2f} s per generation, peak {gib(self.predicted_peak_bytes)} "
                f"of {gib(self.budget_bytes)}, host memory {gib(self.host_bytes)}")


def _devices(devices, bad) -> list[dict]:
    if not isinstance(devices, list) or not all(isinstance(x, dict) for x in devices):
        raise bad("'devices' must be a list of objects, one per card")
    for i, x in enumerate(devices):
        unknown = set(x) - {"hardware", "budget_bytes", "peak_bytes", "components"}
        if unknown or not isinstance(x.get("hardware"), dict) or not isinstance(x.get("budget_bytes"), int):
            raise bad(f"device {i} must have 'hardware' (an object) and 'budget_bytes' (bytes)"
                      + (f", and no {', '.join(sorted(unknown))}" if unknown else ""))
    return [dict(x) for x in devices]


def _parallel(p, d: dict, bad) -> dict | None:
    if p is None:
        return None
    n = len(d.get("devices") or [])
    if not isinstance(p, dict) or set(p) != {"component", "kind", "degree", "devices"}:
        raise bad("'parallel' must be null or an object with exactly 'component', 'kind', 'degree' and 'devices'")
    if p["component"] not in d["components"]:
        raise bad(f"'parallel' names component {p['component']!r}, which the plan does not have")
    if p["kind"] not in PARALLEL_KINDS:
        raise bad(f"'parallel' kind {p['kind']!r} is not one of {', '.join(PARALLEL_KINDS)}")
    degree, devs = p["degree"], p["devices"]
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 2 or not isinstance(devs, list) \
            or len(devs) != degree or len(set(devs)) != degree \
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in devs):
        raise bad(f"'parallel' needs a degree of at least 2 and that many distinct device indices below {n}")
    return dict(p)
