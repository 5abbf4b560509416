"""Readable tables for profiles and plans (rich), also as plain text for `print(plan)`."""
from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from .hardware import GiB

# Plans and profiles are read here, never imported: plan.py imports this module for print(plan).


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def plan_table(plan) -> Table:
    hw = plan.hardware
    t = Table(title=f"tierquant plan: {plan.pipeline.get('class', '?')} on {hw.get('name')} within "
                    f"{_gib(plan.budget_bytes)} GiB", title_justify="left")
    for col in ("component", "scheme", "placement", "compile", "weights GiB", "s / gen", "exp. error"):
        t.add_column(col, justify="left" if col in ("component", "scheme", "placement") else "right")
    for name, c in plan.components.items():
        t.add_row(name, c.scheme, c.placement, "yes" if c.compile else "no", _gib(c.weight_bytes),
                  f"{c.predicted_seconds:.3f}", f"{c.expected_error:.4f}")
    t.caption = (f"predicted {plan.predicted_latency_s:.2f} s per generation ({plan.steps or '?'} steps), "
                 f"peak {_gib(plan.predicted_peak_bytes)} GiB of {_gib(plan.budget_bytes)} GiB on the device, "
                 f"{_gib(getattr(plan, 'host_bytes', 0))} GiB of host memory (pinned copies of swapped and "
                 f"streamed components)")
    t.caption_justify = "left"
    return t


def plan_reasons(plan) -> list[str]:
    """One paragraph per component: why this choice, what lost and why, what stays in bf16."""
    out = []
    for name, c in plan.components.items():
        why = f"{name}: {c.reason}."
        if c.rejected:
            r = c.rejected
            why += f" Rejected {r['scheme']}/{r['placement']}{'+compile' if r['compile'] else ''}: {r['why']}."
        if c.kept:
            why += f" Kept in bf16: {len(c.kept)} Linear layer(s) ({_kept_summary(c.kept)})."
        out.append(why)
    out.append("Embeddings, norms and convolutions always stay in bf16.")
    return out


def _kept_summary(kept: dict[str, str]) -> str:
    reasons: dict[str, int] = {}
    for why in kept.values():
        reasons[why] = reasons.get(why, 0) + 1
    return "; ".join(f"{k}: {v}" for k, v in reasons.items())


def profile_table(profile) -> Table:
    t = Table(title=f"profile: {profile.pipeline} ({profile.steps or '?'} steps, measured on {profile.device})",
              title_justify="left")
    for col in ("component", "class", "params", "weights GiB", "calls", "phase", "GFLOP/call", "act. peak GiB",
                "ms/call"):
        t.add_column(col, justify="left" if col in ("component", "class") else "right")
    for n, c in profile.components.items():
        t.add_row(n, c.class_name, f"{c.params / 1e6:.1f}M", _gib(c.weight_bytes), str(c.calls),
                  str(c.phase), f"{c.flops_per_call / 1e9:.1f}", _gib(c.activation_peak_bytes),
                  f"{c.seconds_per_call * 1e3:.1f}" if c.seconds_per_call is not None else "-")
    return t


def render(table: Table, width: int = 160) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False, color_system=None).print(table)
    return buf.getvalue()


def plan_text(plan, width: int = 100) -> str:
    import textwrap

    text = render(plan_table(plan), width)
    for para in plan_reasons(plan) + [f"note: {n}" for n in plan.notes]:
        text += textwrap.fill(para, width, subsequent_indent="  ") + "\n"
    return text
