"""`tierquant demo`: the whole loop on the embedded pipeline, on whatever machine this is.

Load the trained embedded pipeline, profile it, measure each component's sensitivity to each scheme,
plan for this machine within a budget that forces choices, apply the plan, and judge bf16, tiered and
uniform-nf4 images on the fixed evaluation set. Writes report.html, PNGs, plan.json, quality.json.
"""
from __future__ import annotations

import copy
import html
import json
import time
from pathlib import Path

import numpy as np
import torch

from .errors import HardwareError, NoPlanError
from .fmt import GiB, human_bytes, human_error, human_seconds
from .hardware import check_budget, resolve
from .plan import Plan
from .planner import make_plan
from .report import plan_text

# Largest measured error (1 - cosine of a component's output) the demo's plan accepts.
DEMO_TOLERANCE = 0.02
# Images judged per variant: the model card's 32-item EVAL_SET plus 64 fixed random captions. On 32
# items one borderline image that flips costs 3.1 points of adherence; on 96 it costs 1.04.
EXTRA_ITEMS = 64
# The frontier plotted in the report: flux-dev planned for these cards (roofline, no GPU needed) at
# these budgets (GiB), beside the embedded pipeline on this machine.
FRONTIER_CARDS = ("rtx4090", "l4", "h100")
FRONTIER_GIB = tuple(range(8, 49, 4))


def demo_set(quick: bool = False) -> list[tuple[str, int]]:
    from .pipelines.embedded.scenes import EVAL_SET, caption, sample_spec

    if quick:
        return list(EVAL_SET[:8])
    return list(EVAL_SET) + [(caption(sample_spec(1000 + i)), 1000 + i) for i in range(EXTRA_ITEMS)]


def _budget_between(profile, hw) -> tuple[int, int, int]:
    """(smallest plan, all-bf16 plan, the demo budget): a budget halfway, so that some component
    must give up bytes and the planner has to decide which."""
    try:
        make_plan(profile, hw, 1, pin={n: "nf4" for n in profile.components})
    except NoPlanError as e:
        smallest = e.smallest_bytes
    big = make_plan(profile, hw, 1 << 50, pin={n: "bf16" for n in profile.components}).predicted_peak_bytes
    return smallest, big, (smallest + big) // 2


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _save_png(img: np.ndarray, path: Path, scale: int = 2) -> None:
    from PIL import Image

    im = Image.fromarray(_to_uint8(img))
    im.resize((im.width * scale, im.height * scale), Image.NEAREST).save(path)


def run_demo(out: Path, quick: bool = False, budget: str | int | None = None) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import apply, plan as make_tiered, profile
    from .pipelines.embedded import DEFAULT_CALL, load_embedded_pipeline
    from .pipelines.embedded.judge import judge
    from .quality import adherence, psnr
    from .sensitivity import measure

    con = Console()
    out.mkdir(parents=True, exist_ok=True)
    eval_set = demo_set(quick)
    hw = resolve(None)
    timings: dict[str, float] = {}
    steps = ["load", "profile", "sensitivity", "plan", "frontier", "apply", "bf16", "tiered", "uniform-nf4",
             "report"]
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), TimeElapsedColumn(), console=con,
                  transient=False) as bar:
        task = bar.add_task("loading the embedded pipeline", total=len(steps))

        def stage(name, text):
            timings[name] = time.perf_counter()
            bar.update(task, description=text)

        def done(name):
            timings[name] = time.perf_counter() - timings[name]
            bar.advance(task)

        stage("load", "loading the embedded pipeline")
        # On the device it plans for: sensitivity runs each scheme's kernels, FP8 only on a GPU.
        pipe = load_embedded_pipeline(device=hw.device, dtype=torch.bfloat16)
        call = dict(DEFAULT_CALL)
        first_prompt = eval_set[0][0]
        done("load")

        stage("profile", "profiling one generation")
        prof = profile(pipe, prompt=first_prompt, generator=torch.Generator().manual_seed(0), **call)
        done("profile")

        stage("sensitivity", "measuring scheme sensitivity")
        prof.sensitivity = measure(pipe, prompt=first_prompt, generator=torch.Generator().manual_seed(0), **call)
        done("sensitivity")

        stage("plan", "planning for this machine")
        smallest, full, auto = _budget_between(prof, hw)
        budget_bytes = auto if budget is None else budget
        tiered_plan = make_tiered(prof, budget=budget_bytes, tolerance=DEMO_TOLERANCE)
        nf4_plan = make_plan(prof, hw, 1 << 50, pin={n: "nf4" for n in prof.components})
        # The same profile planned for another card: a roofline over the hardware table, no GPU needed.
        gpu_plan = make_tiered(prof, budget="24GiB", target="rtx4090")
        done("plan")

        stage("frontier", "planning across budgets")
        frontier = budget_frontier(prof, smallest, full)
        done("frontier")

        stage("apply", "applying plans")
        tiered = apply(copy.deepcopy(pipe), tiered_plan, progress=False)
        nf4 = apply(copy.deepcopy(pipe), nf4_plan, progress=False)
        done("apply")

        prompts = [p for p, _ in eval_set]
        seeds = [s for _, s in eval_set]
        images: dict[str, np.ndarray] = {}
        for name, variant in (("bf16", pipe), ("tiered", tiered), ("uniform-nf4", nf4)):
            stage(name, f"generating: {name}")
            images[name] = _generate(variant, prompts, seeds, call)
            done(name)

        stage("report", "writing the report")
        quality = {
            "adherence": {k: adherence(list(v), prompts, judge) for k, v in images.items()},
            "psnr_db": {k: float(np.mean([psnr(a, b) for a, b in zip(images["bf16"], images[k])]))
                        for k in ("tiered", "uniform-nf4")},
            "sensitivity": prof.sensitivity,
            "budget_bytes": int(budget_bytes),
            "eval_images": len(prompts),
        }
        (out / "quality.json").write_text(json.dumps(quality, indent=1) + "\n")
        tiered_plan.save(out / "plan.json")
        gpu_plan.save(out / "plan-rtx4090-24GiB.json")
        grid = []
        for i in range(min(4, len(prompts))):
            row = []
            for k in images:
                path = out / f"{k}-{i}.png"
                _save_png(images[k][i], path)
                row.append(path.name)
            grid.append((prompts[i], row))
        done("report")

    plot = _plot(frontier, out / "frontier.png")
    _write_html(out / "report.html", grid, list(images), tiered_plan, gpu_plan, quality, prof, timings,
                (smallest, full, budget_bytes), hw, frontier, plot)
    con.print(plan_text(tiered_plan, width=max(con.width, 80)), highlight=False, markup=False, soft_wrap=True)
    con.print(f"adherence: " + ", ".join(f"{k} {v:.3f}" for k, v in quality["adherence"].items()) +
              f"; PSNR vs bf16: " + ", ".join(f"{k} {psnr_text(v)}" for k, v in quality["psnr_db"].items()))
    con.print(f"report: {out / 'report.html'}")
    return quality


def _generate(pipe, prompts, seeds, call, batch: int = 16) -> np.ndarray:
    """Images for (prompt, seed) pairs, batched; each image has its own generator, so batching does
    not change what a seed draws."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        res = pipe(prompt=prompts[i:i + batch], generator=gens, output_type="np", **call)
        out.append(np.asarray(res.images, dtype=np.float32))
    return np.concatenate(out)


def budget_frontier(prof, smallest: int, full: int, points: int = 8) -> dict:
    """Predicted seconds per image against the budget: the embedded pipeline on this machine (between
    its smallest plan and all-bf16), and flux-dev on FRONTIER_CARDS (roofline; budgets over a card's
    memory or under its smallest plan are left out). {series: [(budget_bytes, seconds), ...]}."""
    from . import plan as make

    series: dict[str, list[tuple[int, float]]] = {}
    step = max(1, (full - smallest) // (points - 1))
    here = []
    for b in range(smallest, full + step, step):
        try:
            here.append((b, make(prof, budget=b, tolerance=DEMO_TOLERANCE).predicted_latency_s))
        except NoPlanError:
            continue
    series["embedded (this machine)"] = here
    for card in FRONTIER_CARDS:
        hw = resolve(card)
        pts = []
        for g in FRONTIER_GIB:
            try:
                check_budget(g * GiB, hw)
                pts.append((g * GiB, make("flux-dev", budget=g * GiB, target=card, measure=False).predicted_latency_s))
            except (NoPlanError, HardwareError):
                continue
        series[f"flux-dev on {card}"] = pts
    return series


def _plot(frontier: dict, path: Path) -> str | None:
    """frontier.png (matplotlib), or None with the reason kept for the report when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, pts in frontier.items():
        if not pts:
            continue
        mine = name.startswith("embedded")
        ax = left if mine else right
        scale = 2**20 if mine else GiB
        ax.plot([b / scale for b, _ in pts], [s for _, s in pts], marker="o", label=name)
    left.set(title="embedded pipeline, this machine", xlabel="budget (MiB)", ylabel="predicted seconds per image")
    right.set(title="flux-dev, 1024x1024, 28 steps (roofline)", xlabel="budget (GiB)",
              ylabel="predicted seconds per image")
    right.set_yscale("log")
    right.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    right.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def psnr_text(db: float | None) -> str:
    """PSNR in dB; images equal to the reference have infinite PSNR: 'identical'."""
    if db is None or (isinstance(db, float) and np.isnan(db)):
        return "-"
    return "identical" if np.isinf(db) else f"{db:.1f} dB"


def _write_html(path, grid, variants, plan: Plan, gpu_plan, quality, prof, timings, budgets, hw,
                frontier: dict | None = None, plot: str | None = None) -> None:
    from .report import html_table, plan_html, profile_html
    from .schemes import CATALOG

    e = html.escape
    rows = "".join(
        f"<tr><td>{e(prompt)}</td>" + "".join(f'<td><img src="{src}" width="128" alt="{e(v)}"></td>'
                                              for src, v in zip(row, variants)) + "</tr>"
        for prompt, row in grid)
    head = "".join(f"<th>{e(v)}</th>" for v in variants)
    adh = html_table(["variant", "adherence (judge)", "PSNR vs bf16"],
                     [[k, f"{v:.3f}", "identical (the reference)" if k == "bf16" else
                       psnr_text(quality["psnr_db"].get(k))] for k, v in quality["adherence"].items()])
    schemes = [s for s in CATALOG if any(s in d for d in quality["sensitivity"].values())]
    sens = html_table(["component", *schemes],
                      [[c, *(human_error(d[s]) if s in d else "-" for s in schemes)]
                       for c, d in quality["sensitivity"].items()])
    times = html_table(["stage", "time"], [[k, human_seconds(v)] for k, v in timings.items()]
                       + [["total", human_seconds(sum(timings.values()))]])
    smallest, full, budget = budgets
    if frontier:
        flux_rows = {}
        for name, pts in frontier.items():
            if name.startswith("flux-dev"):
                for b, sec in pts:
                    flux_rows.setdefault(b, {})[name.removeprefix("flux-dev on ")] = sec
        cards = [n.removeprefix("flux-dev on ") for n in frontier if n.startswith("flux-dev")]
        flux_table = html_table(["budget", *cards], [[human_bytes(b), *(human_seconds(r[c]) if c in r else "-"
                                                                        for c in cards)]
                                                     for b, r in sorted(flux_rows.items())])
        mine = frontier.get("embedded (this machine)", [])
        mine_table = html_table(["budget", "predicted per image"],
                                [[human_bytes(b), human_seconds(sec)] for b, sec in mine])
        figure = (f'<p><img src="{e(plot)}" alt="predicted seconds per image against the budget" '
                  f'style="max-width:100%;image-rendering:auto"></p>' if plot else
                  "<p class=\"caption\">No plot: matplotlib is not installed (pip install 'tierquant[demo]'); "
                  "the figures are in the tables below.</p>")
        frontier_html = (f"<h2>Predicted seconds per image against the budget</h2>{figure}"
                         f"<p>flux-dev, 1024x1024, 28 steps, planned for each card (roofline; a budget over the "
                         f"card's memory or under its smallest plan is left out):</p>{flux_table}"
                         f"<p>The embedded pipeline on this machine:</p>{mine_table}")
    else:
        frontier_html = ""
    flux = (f"<h2>The plan it would make on an RTX 4090 at 24 GiB</h2>{plan_html(gpu_plan)}"
            "<p>For Flux.1-dev at full size: <code>tierquant plan --pipeline flux-dev --target rtx4090 "
            "--budget 24GiB</code>.</p>")
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>tierquant demo</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}
table{{border-collapse:collapse;margin:0.5em 0}} td,th{{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left}}
th{{background:#f3f3f3}} td.num,th.num{{text-align:right;font-variant-numeric:tabular-nums}}
caption{{text-align:left;font-weight:bold;padding:4px 0}} .caption{{color:#555;font-size:90%}}
ul.reasons li{{margin:0.3em 0}} img{{image-rendering:pixelated}}</style></head><body>
<h1>tierquant demo: the embedded pipeline on {e(hw.name)}</h1>
<p>Budget {e(human_bytes(budget))}, halfway between the smallest plan ({e(human_bytes(smallest))}) and all-bf16
({e(human_bytes(full))}). Tolerance {DEMO_TOLERANCE} (1 - cosine of a component's output).</p>
<h2>Images (same seeds)</h2><table><tr><th>prompt</th>{head}</tr>{rows}</table>
<h2>Quality on {quality['eval_images']} evaluation images</h2>{adh}
<h2>Measured sensitivity (1 - cosine of the component's output, quantized alone)</h2>{sens}
<h2>The plan, and why</h2>{plan_html(plan)}
<h2>Profile</h2>{profile_html(prof)}
{frontier_html}
{flux}
<h2>Timings</h2>{times}
</body></html>
""")
