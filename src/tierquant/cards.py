"""Several cards on the command line: `tierquant plan --budget 12GiB,12GiB [--target h100[,h100]]`
and `tierquant run --devices 0,1`. Checks only: what they mean is `devices.py`'s and `launch.py`'s."""
from __future__ import annotations

from .errors import TierquantError


def plan_budgets(budget: str, target: str | None, plan_hardware) -> tuple:
    """(budget, target) for `tierquant.plan` from --budget and --target, every budget checked against
    its card's memory: one budget and its card (`plan_hardware`: --target or the running GPU), or a
    list of budgets and of cards."""
    from .arguments import check_targets
    from .hardware import HardwareError, check_budget, parse_budget, resolve

    parts = [p.strip() for p in str(budget).split(",")]
    if not all(parts):
        raise HardwareError(f"--budget {budget!r} has an empty entry: give one budget per card, like 12GiB,12GiB")
    if len(parts) > 8:
        raise HardwareError(f"{len(parts)} budgets: tierquant plans for at most 8 cards of one machine")
    budgets = [parse_budget(p) for p in parts]  # the command line's messages (a bare number, a unit)
    if len(budgets) == 1:
        check_budget(budgets[0], plan_hardware(target))
        return budgets[0], target
    hws = check_targets(target, len(budgets), resolve)
    for i, (b, hw) in enumerate(zip(budgets, hws)):
        try:
            check_budget(b, hw)
        except TierquantError as e:
            raise type(e)(f"card {i}: {e}") from None
    return budgets, hws


def parse_devices(text: str | None) -> list[int] | None:
    """--devices 0,1,2,3 -> [0, 1, 2, 3]: distinct CUDA device indices."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    if not all(p.isdigit() for p in parts):
        raise TierquantError(f"--devices takes CUDA device indices separated by commas, like 0,1,2,3; got {text!r}")
    devices = [int(p) for p in parts]
    if len(set(devices)) != len(devices):
        raise TierquantError(f"--devices {text}: each card once")
    return devices
