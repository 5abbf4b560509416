"""Figures as people read them: sizes in B / KiB / MiB / GiB / TiB and times in ns / µs / ms / s / min,
each with three significant digits (never "0.00 GiB", never "0.000 s").

Plain Python, no imports: the planner's modules, the report and the CLI all use it.
"""
from __future__ import annotations

import math

KiB = 1024
MiB = 1024**2
GiB = 1024**3

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def _sig3(v: float) -> str:
    """v (0 <= v < 1000 once rounded) with three significant digits, trailing zeros kept: 24.0, 1.50, 0.977."""
    if v == 0:
        return "0"
    s = f"{v:#.3g}"
    return s[:-1] if s.endswith(".") else s


def _rounds_to(v: float) -> float:
    return float(f"{v:.3g}")


def _special(x, fmt, infinite: str) -> str | None:
    """The figures every formatter spells the same way: missing, not a number, negative, infinite."""
    if x is None:
        return "-"
    x = float(x)
    if math.isnan(x):
        return "?"
    if x < 0:
        return "-" + fmt(-x)
    return infinite if math.isinf(x) else None


def human_bytes(n: float | int | None) -> str:
    """1536 -> '1.50 KiB'; 24 * 2**30 -> '24.0 GiB'; 512 -> '512 B'. Switches unit at 1000 of the smaller one,
    so a figure never has more than three digits: 1000 MiB -> '0.977 GiB'."""
    special = _special(n, human_bytes, "unlimited")
    if special is not None:
        return special
    n = float(n)
    if _rounds_to(n) < 1000:
        return f"{n:.0f} B"
    v, i = n, 0
    while _rounds_to(v) >= 1000 and i < len(_BYTE_UNITS) - 1:
        v /= 1024
        i += 1
    return f"{_sig3(v)} {_BYTE_UNITS[i]}"


def human_seconds(s: float | None) -> str:
    """0.000123 -> '123 µs'; 0.0469 -> '46.9 ms'; 2.9 -> '2.90 s'; 754 -> '12.6 min'; 0 -> '0 s'."""
    special = _special(s, human_seconds, "forever")
    if special is not None:
        return special
    s = float(s)
    if s == 0:
        return "0 s"
    if s >= 600:
        m = s / 60
        return f"{_sig3(m)} min" if _rounds_to(m) < 1000 else f"{s / 3600:.0f} h"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if _rounds_to(s / scale) >= 1:
            return f"{_sig3(s / scale)} {unit}"
    return f"{_sig3(s / 1e-9)} ns" if _rounds_to(s / 1e-9) >= 1 else f"{s / 1e-9:.2g} ns"


def human_budget(n: int) -> str:
    """A budget in binary units, with the decimal figure it was given in when it was one:
    24 * 10**9 -> '22.4 GiB (24 GB)'; 24 * 2**30 -> '24.0 GiB'."""
    text = human_bytes(n)
    n = int(n)
    if n > 0 and n % MiB:
        if n % 10**9 == 0:
            return f"{text} ({n // 10**9} GB)"
        if n % 10**6 == 0:
            return f"{text} ({n // 10**6} MB)"
    return text


def human_error(e: float | None) -> str:
    """An expected error (1 - cosine), two significant digits: 0 -> '0', 0.00052 -> '0.00052'."""
    if e is None:
        return "-"
    if e == 0:
        return "0"
    return f"{e:.2g}" if e >= 1e-4 else f"{e:.1e}"
