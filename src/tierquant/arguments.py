"""Checking what users pass to the public API, before any work: a bad argument raises a
TierquantError subclass whose message names it and says what to pass instead."""
from __future__ import annotations

import re

from .errors import (HardwareError, PlanError, PlanNotRunnableError, SchemeError, TierquantError,
                     UnsupportedOptionError)
from .hardware import Hardware, parse_budget
from .plan import Plan
from .profile import Profile


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_steps(steps, name: str):
    if steps is None:
        return None
    if not is_int(steps) or steps < 1:
        raise TierquantError(f"{name} must be a whole number of denoising steps, at least 1; got {steps!r}")
    return steps


def check_tolerance(tolerance):
    import math

    if tolerance is None:
        return None
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) \
            or tolerance < 0:
        raise TierquantError(f"tolerance must be a number >= 0 (the expected error allowed per component, "
                             f"1 - cosine of its output, e.g. 0.01); got {tolerance!r}")
    return float(tolerance)


def check_budget(budget) -> int:
    import math

    if budget is None:
        raise HardwareError("a budget is needed: write it like 24GiB, 16GB, 12000MiB, or a number of bytes")
    if isinstance(budget, str) and re.fullmatch(r"\s*[0-9]*\.?[0-9]+\s*", budget):
        raise HardwareError(f"budget {budget!r} has no unit: write {budget.strip()}GiB (or GB, MiB, ...), "
                            "or pass a number of bytes as an int")
    if isinstance(budget, float) and not math.isfinite(budget):
        raise HardwareError(f"budget must be a finite number of bytes, got {budget!r}")
    if not isinstance(budget, (str, int, float)) or isinstance(budget, bool):
        raise HardwareError(f"budget must be a string like 24GiB or a number of bytes, got {type(budget).__name__}")
    return parse_budget(budget)


def check_budgets(budget) -> list[int]:
    """One budget, or one per card: a list or tuple, or a string with commas ('12GiB,12GiB')."""
    if isinstance(budget, str) and "," in budget:
        budget = [b for b in budget.split(",")]
    if isinstance(budget, (list, tuple)):
        if not budget:
            raise HardwareError("budget is an empty list: give one budget per card, like ['12GiB', '12GiB']")
        if any(isinstance(b, str) and not b.strip() for b in budget):
            raise HardwareError(f"budget {','.join(map(str, budget))!r} has an empty entry: give one budget per "
                                "card, like 12GiB,12GiB")
        if len(budget) > 8:
            raise HardwareError(f"{len(budget)} budgets: tierquant plans for at most 8 cards of one machine")
        return [check_budget(b.strip() if isinstance(b, str) else b) for b in budget]
    return [check_budget(budget)]


def check_targets(target, n: int, resolve) -> list[Hardware]:
    """The cards of a plan over `n` cards: one target for all, one per card, or (None) the GPUs here."""
    from .hardware import detect_cards

    if isinstance(target, str) and "," in target:
        target = target.split(",")
    if isinstance(target, (list, tuple)):
        if len(target) != n:
            raise HardwareError(f"{len(target)} targets for {n} budgets: give one target for all the cards, or one "
                                "per budget")
        return [check_target(t.strip() if isinstance(t, str) else t, resolve) for t in target]
    if target is not None:
        return [check_target(target, resolve)] * n
    here = detect_cards()
    if len(here) < n:
        raise HardwareError(f"{n} budgets, but torch sees {len(here)} CUDA GPU(s) here: give as many budgets as "
                            "there are cards, or pass target= (--target) to plan for cards that are not here")
    return here[:n]


def check_target(target, resolve) -> Hardware:
    if target is not None and not isinstance(target, (str, Hardware)):
        raise HardwareError(f"target must be a card's name (e.g. 'rtx4090'), a Hardware or None, got {target!r:.60}")
    return resolve(target)


def check_catalog(catalog):
    from .schemes import CATALOG, Scheme

    if catalog is None:
        return None
    if isinstance(catalog, str):
        catalog = [catalog]
    if isinstance(catalog, (list, tuple, set, frozenset)):
        unknown = [s for s in catalog if s not in CATALOG]
        if unknown or not catalog:
            raise SchemeError(f"catalog must name known schemes ({', '.join(CATALOG)}); got {sorted(map(str, catalog))}")
        return {s: CATALOG[s] for s in catalog}
    if isinstance(catalog, dict) and catalog and all(isinstance(v, Scheme) for v in catalog.values()):
        return catalog
    raise SchemeError(f"catalog must be a list of scheme names or a dict of Schemes, got {catalog!r:.60}")


def check_pin(pin):
    from .schemes import CATALOG

    if pin is None:
        return None
    if not isinstance(pin, dict):
        raise TierquantError(f"pin must be a dict {{component: scheme}}, e.g. {{'transformer': 'int8-weight'}}; "
                             f"got a {type(pin).__name__}")
    for name, scheme in pin.items():
        if not isinstance(name, str) or not isinstance(scheme, str):
            raise TierquantError(f"pin must map component names to scheme names (strings); got {name!r}: {scheme!r}")
        if scheme not in CATALOG:
            raise SchemeError(f"cannot pin {name!r} to unknown scheme {scheme!r}: choose one of {', '.join(CATALOG)}")
    return pin


def parse_pins(items: list[str] | None) -> dict[str, str]:
    """--pin COMPONENT=SCHEME (repeatable) -> {component: scheme}."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise TierquantError(f"--pin takes COMPONENT=SCHEME (e.g. --pin transformer=fp8-dynamic), got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def check_pin_names(pin, components) -> None:
    for name in pin or {}:
        if name not in components:
            raise TierquantError(f"cannot pin {name!r}: the pipeline has no such component "
                                 f"(it has {', '.join(components)})")


def check_pipe(pipe) -> None:
    """A pipeline: callable, with torch modules among its components (or attributes)."""
    from .components import discover

    if isinstance(pipe, (Plan, Profile)) or not callable(pipe) or isinstance(pipe, type):
        raise TierquantError(f"expected a pipeline (a diffusers DiffusionPipeline, or a callable object whose "
                             f"attributes are its torch modules), got {type(pipe).__name__} {pipe!r:.40}")
    if not discover(pipe):
        raise TierquantError(f"{type(pipe).__name__} has no torch.nn.Module components: pass a diffusers pipeline "
                             "(or an object whose attributes are its models)")


def check_call(pipe, call_kwargs: dict) -> None:
    """The pipeline's __call__ takes every option given, and the step count is a positive int."""
    import inspect

    if "num_inference_steps" in call_kwargs:
        check_steps(call_kwargs["num_inference_steps"], "num_inference_steps")
    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in call_kwargs if k not in params]
    if unknown:
        raise UnsupportedOptionError(f"{type(pipe).__name__} does not take {', '.join(map(repr, unknown))}; "
                                     f"its options are {', '.join(p for p in params if p != 'self')}")


def check_plan(plan) -> None:
    if not isinstance(plan, Plan):
        raise PlanError(f"expected a tierquant Plan (from tierquant.plan(...) or tierquant.Plan.load(path)), "
                        f"got {type(plan).__name__} {plan!r:.40}")


def check_device(device) -> None:
    if device is None:
        return
    import torch

    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise PlanNotRunnableError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r:.40}") from None


def check_checkpoint(path) -> None:
    """A local pipeline folder (with model_index.json), or what looks like a hub repo id (org/name)."""
    from pathlib import Path

    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise TierquantError(f"expected a pipeline folder or a hub repo id (org/name), got {path!r:.60}")
    p = Path(path)
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise TierquantError(f"{str(path)!r} is a folder but not a diffusers pipeline: it has no model_index.json")
        return
    if p.exists():
        raise TierquantError(f"{str(path)!r} is a file: pass the pipeline's folder (the one with model_index.json)")
    if isinstance(path, Path) or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) or str(path).startswith((".", "/")):
        raise TierquantError(f"no pipeline folder at {str(path)!r} (and it is not a hub repo id like org/name)")
