"""Readable tables for profiles and plans: rich tables for the terminal, plain text for `print(plan)`,
HTML for reports. Every figure carries its unit (`fmt.py`); names are never cut.
"""
from __future__ import annotations

import html
import io
import re

from rich.console import Console
from rich.table import Table

from .fmt import GiB, human_budget, human_bytes, human_error, human_seconds

# Plans and profiles are read here, never imported: plan.py imports this module for print(plan).

_NAME_COLUMNS = ("component", "class", "scheme", "placement")


# -- the figures, once, for every output ------------------------------------------------------
def _cards(plan) -> list[dict]:
    devices = getattr(plan, "devices", None) or []
    return devices if len(devices) > 1 else []


def plan_title(plan) -> str:
    cards = _cards(plan)
    if cards:
        where = ", ".join(f"{d['hardware'].get('name')} ({human_budget(d['budget_bytes'])})" for d in cards)
        return f"tierquant plan: {plan.pipeline.get('class', '?')} on {len(cards)} cards: {where}"
    return (f"tierquant plan: {plan.pipeline.get('class', '?')} on {plan.hardware.get('name')} within "
            f"{human_budget(plan.budget_bytes)}")


def plan_columns(plan=None) -> list[str]:
    card = ["card"] if plan is not None and _cards(plan) else []
    return ["component", *card, "scheme", "placement", "compile", "weights", "time / generation", "exp. error"]


def _card(plan, name: str, c) -> list[str]:
    if not _cards(plan):
        return []
    par = getattr(plan, "parallel", None)
    if par and par["component"] == name:
        return [f"{','.join(map(str, par['devices']))} ({par['kind']} x{par['degree']})"]
    if par:
        return [",".join(map(str, par["devices"]))]
    return [str(c.device)]


def plan_rows(plan) -> list[list[str]]:
    return [[name, *_card(plan, name, c), c.scheme, c.placement, "yes" if c.compile else "no",
             human_bytes(c.weight_bytes), human_seconds(c.predicted_seconds), human_error(c.expected_error)]
            for name, c in plan.components.items()]


def plan_caption(plan) -> str:
    host = getattr(plan, "host_bytes", 0) or 0
    host_text = (f"{human_bytes(host)} of host memory (pinned copies of swapped and streamed components)" if host
                 else "no host memory (every component resident)")
    cards = _cards(plan)
    if cards:
        peaks = "; ".join(f"card {i}: peak {human_bytes(d['peak_bytes'])} of {human_budget(d['budget_bytes'])}"
                          for i, d in enumerate(cards))
        return (f"predicted {human_seconds(plan.predicted_latency_s)} per generation ({plan.steps or '?'} steps); "
                f"{peaks}; {host_text}")
    return (f"predicted {human_seconds(plan.predicted_latency_s)} per generation ({plan.steps or '?'} steps), "
            f"peak {human_bytes(plan.predicted_peak_bytes)} of {human_budget(plan.budget_bytes)} on the device, "
            f"{host_text}")


def profile_title(profile) -> str:
    return f"profile: {profile.pipeline} ({profile.steps or '?'} steps, measured on {profile.device})"


def profile_columns() -> list[str]:
    return ["component", "class", "params", "weights", "calls", "phase", "work / call", "activation peak",
            "time / call"]


def profile_rows(profile) -> list[list[str]]:
    return [[n, c.class_name, human_count(c.params), human_bytes(c.weight_bytes), str(c.calls), str(c.phase),
             human_flops(c.flops_per_call), human_bytes(c.activation_peak_bytes),
             human_seconds(c.seconds_per_call) if c.seconds_per_call is not None else "-"]
            for n, c in profile.components.items()]


def human_count(n: float) -> str:
    """Parameters: 11.9B, 123M, 4.00k, 12."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale * 0.9995:
            return f"{n / scale:#.3g}".rstrip(".") + unit
    return f"{n:.0f}"


def human_flops(n: float) -> str:
    """Work: 74.4 TFLOP, 1.20 GFLOP, 0 FLOP."""
    for scale, unit in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP")):
        if n >= scale * 0.9995:
            return f"{n / scale:#.3g}".rstrip(".") + f" {unit}"
    return f"{n:.0f} FLOP"


# -- rich --------------------------------------------------------------------------------------
def _table(title: str, columns: list[str], rows: list[list[str]], caption: str | None = None) -> Table:
    t = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for i, col in enumerate(columns):
        if col in _NAME_COLUMNS:  # never cut a name: as wide as the longest, folded (not "…") if ever forced
            widest = max([len(col)] + [len(r[i]) for r in rows])
            t.add_column(col, justify="left", overflow="fold", min_width=widest)
        else:
            t.add_column(col, justify="right", overflow="fold")
    for r in rows:
        t.add_row(*r)
    return t


def plan_table(plan) -> Table:
    return _table(plan_title(plan), plan_columns(plan), plan_rows(plan), plan_caption(plan))


def profile_table(profile) -> Table:
    return _table(profile_title(profile), profile_columns(), profile_rows(profile))


def stdout_console() -> Console:
    """stdout as a rich console. When stdout is not a terminal (a pipe, a file) rich would cut tables
    at 80 columns: give it room instead, so that names and figures come through whole."""
    con = Console()
    if not con.is_terminal:
        con = Console(width=max(200, con.width), soft_wrap=True)
    return con


def render(table: Table, width: int = 160) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False, color_system=None).print(table)
    return buf.getvalue()


# -- the reasons -------------------------------------------------------------------------------
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
        out.append(humanize(why))
    out.append("Embeddings, norms and convolutions always stay in bf16.")
    return out


_SECONDS = re.compile(r"(?<![\w.])(\d+)\.(\d+) s\b")
_GIB = re.compile(r"(?<![\w.])(\d+)\.(\d+) GiB\b")


def humanize(text: str) -> str:
    """Figures the planner wrote as decimal seconds or GiB ("0.147 s", "0.16 GiB") in readable units
    ("147 ms", "164 MiB"), no more precise than written ("0.001 s" is "1 ms", not "1.00 ms"); a figure
    that rounded to zero says how small it is ("< 0.5 ms")."""
    def seconds(m):
        value, places = float(f"{m.group(1)}.{m.group(2)}"), len(m.group(2))
        if value == 0:
            return f"< {human_seconds(0.5 * 10**-places)}"
        if value >= 1:
            return m.group(0)
        exp, unit = (3, "ms") if value >= 1e-3 else (6, "µs")
        return f"{value * 10**exp:.{max(0, places - exp)}f} {unit}"

    def gib(m):
        value, places = float(f"{m.group(1)}.{m.group(2)}"), len(m.group(2))
        if value == 0:
            return f"< {human_bytes(0.5 * 10**-places * GiB)}"
        return human_bytes(value * GiB) if value < 1 else m.group(0)

    return _GIB.sub(gib, _SECONDS.sub(seconds, text))


def _kept_summary(kept: dict[str, str]) -> str:
    reasons: dict[str, int] = {}
    for why in kept.values():
        reasons[why] = reasons.get(why, 0) + 1
    return "; ".join(f"{k}: {v}" for k, v in reasons.items())


def plan_text(plan, width: int = 100) -> str:
    """The table at its natural width (never squeezed: a column cut is worse than a long line), then
    the reasons and notes wrapped at `width`."""
    import textwrap

    text = render(plan_table(plan), max(width, 200))
    for para in plan_reasons(plan) + [f"note: {n}" for n in plan.notes]:
        text += textwrap.fill(para, width, subsequent_indent="  ") + "\n"
    return text


def list_tables(builtins, targets, schemes, system_memory: int) -> list[Table]:
    """`tierquant list`: the built-in pipelines, the targets and the schemes (each passed in as
    the registries' values: this module imports none of them)."""
    pipes = Table(title="built-in pipelines (`--pipeline NAME`: full-size configs, no weights needed)",
                  title_justify="left", caption_justify="left",
                  caption="also: `embedded`, the small trained pipeline shipped with tierquant "
                          "(`tierquant run --pipeline embedded`, `tierquant demo`)")
    for col in ("name", "class", "components", "default call", "weights from"):
        pipes.add_column(col, overflow="fold")
    for b in builtins:
        c = b.call
        frames = f", {c['num_frames']} frames" if "num_frames" in c else ""
        pipes.add_row(b.name, b.pipeline, ", ".join(b.models),
                      f"{c.get('width', '?')}x{c.get('height', '?')}{frames}, {c.get('num_inference_steps', '?')} "
                      f"steps, guidance {c.get('guidance_scale', '-')}", b.repo)
    cards = Table(title="targets (`--target NAME`)", title_justify="left")
    for col in ("name", "memory", "bandwidth", "bf16 dense", "FP8", "int8 dense", "compute capability"):
        cards.add_column(col, justify="left" if col == "name" else "right", overflow="fold")
    for h in targets:
        cards.add_row(h.name, human_bytes(h.memory_bytes) if h.memory_bytes else
                      f"this machine's ({human_bytes(system_memory)})", f"{h.bandwidth / 1e9:.0f} GB/s",
                      f"{h.bf16_flops / 1e12:.4g} TFLOPS", f"yes, {h.fp8_flops / 1e12:.4g} TFLOPS" if h.has_fp8 else "no",
                      f"{h.int8_ops / 1e12:.4g} TOPS" if h.int8_ops else "-",
                      f"{h.capability[0]}.{h.capability[1]}" if h.capability else "-")
    kinds = Table(title="schemes (`--pin COMPONENT=SCHEME`)", title_justify="left")
    for col in ("name", "bytes / param", "needs", "library", "description"):
        kinds.add_column(col, justify="right" if col == "bytes / param" else "left", overflow="fold")
    for s in schemes:
        needs = "FP8 GPU (capability 8.9+)" if s.needs_fp8 else ("CUDA GPU" if s.needs_cuda else "-")
        kinds.add_row(s.name, f"{s.bytes_per_param:.3g}", needs, s.backend, s.description)
    return [pipes, cards, kinds]


# -- HTML --------------------------------------------------------------------------------------
def html_table(columns: list[str], rows: list[list], caption: str | None = None, title: str | None = None) -> str:
    """A headed HTML table; columns other than names are right-aligned. Cells are escaped."""
    e = html.escape
    align = ["" if c in _NAME_COLUMNS or i == 0 else ' class="num"' for i, c in enumerate(columns)]
    head = "".join(f"<th{a}>{e(str(c))}</th>" for c, a in zip(columns, align))
    body = "".join("<tr>" + "".join(f"<td{a}>{e(str(v))}</td>" for v, a in zip(r, align)) + "</tr>" for r in rows)
    cap = f"<caption>{e(title)}</caption>" if title else ""
    foot = f'<p class="caption">{e(caption)}</p>' if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{foot}"


def plan_html(plan, reasons: bool = True) -> str:
    out = html_table(plan_columns(plan), plan_rows(plan), plan_caption(plan), plan_title(plan))
    if reasons:
        items = plan_reasons(plan) + [f"note: {n}" for n in plan.notes]
        out += "<ul class=\"reasons\">" + "".join(f"<li>{html.escape(p)}</li>" for p in items) + "</ul>"
    return out


def profile_html(profile) -> str:
    return html_table(profile_columns(), profile_rows(profile), title=profile_title(profile))
