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

from .hardware import MiB
from .plan import Plan
from .errors import NoPlanError
from .hardware import resolve
from .planner import make_plan
from .report import plan_text

# Largest measured error (1 - cosine of a component's output) the demo's plan accepts.
DEMO_TOLERANCE = 0.02
# Images judged per variant: the model card's 32-item EVAL_SET plus 64 fixed random captions. On 32
# items one borderline image that flips costs 3.1 points of adherence; on 96 it costs 1.04.
EXTRA_ITEMS = 64


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
    steps = ["load", "profile", "sensitivity", "plan", "apply", "bf16", "tiered", "uniform-nf4", "report"]
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
        pipe = load_embedded_pipeline(device="cpu", dtype=torch.bfloat16)
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

    timings = {k: round(v, 2) for k, v in timings.items()}
    _write_html(out / "report.html", grid, list(images), tiered_plan, gpu_plan, quality, prof, timings,
                (smallest, full, budget_bytes), hw)
    con.print(plan_text(tiered_plan, width=max(con.width, 80)), highlight=False)
    con.print(f"adherence: " + ", ".join(f"{k} {v:.3f}" for k, v in quality["adherence"].items()) +
              f"; PSNR vs bf16: " + ", ".join(f"{k} {v:.1f} dB" for k, v in quality["psnr_db"].items()))
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


def _write_html(path, grid, variants, plan: Plan, gpu_plan, quality, prof, timings, budgets, hw) -> None:
    from .report import render, plan_table, profile_table

    e = html.escape
    rows = "".join(
        f"<tr><td>{e(prompt)}</td>" + "".join(f'<td><img src="{src}" width="128"></td>' for src in row) + "</tr>"
        for prompt, row in grid)
    head = "".join(f"<th>{e(v)}</th>" for v in variants)
    adh = "".join(f"<tr><td>{e(k)}</td><td>{v:.3f}</td><td>{quality['psnr_db'].get(k, float('nan')):.1f}</td></tr>"
                  for k, v in quality["adherence"].items())
    sens = "".join(f"<tr><td>{e(c)}</td>" + "".join(f"<td>{e(s)}: {v:.4f}</td>" for s, v in d.items()) + "</tr>"
                   for c, d in quality["sensitivity"].items())
    smallest, full, budget = budgets
    flux = (f"<h2>The plan it would make on an RTX 4090 at 24 GiB</h2><pre>{e(render(plan_table(gpu_plan)))}</pre>"
            "<p>For Flux.1-dev at full size: <code>tierquant plan --pipeline flux-dev --target rtx4090 "
            "--budget 24GiB</code>.</p>")
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>tierquant demo</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}} td,th{{padding:4px 8px;border-bottom:1px solid #ddd}}
pre{{font-size:11px;background:#f6f6f6;padding:8px;overflow:auto}} img{{image-rendering:pixelated}}</style></head><body>
<h1>tierquant demo: the embedded pipeline on {e(hw.name)}</h1>
<p>Budget {budget / MiB:.1f} MiB, halfway between the smallest plan ({smallest / MiB:.1f} MiB) and all-bf16
({full / MiB:.1f} MiB). Tolerance {DEMO_TOLERANCE} (1 - cosine of a component's output).</p>
<h2>Images (same seeds)</h2><table><tr><th>prompt</th>{head}</tr>{rows}</table>
<h2>Quality on {quality['eval_images']} evaluation images</h2>
<table><tr><th>variant</th><th>adherence (judge)</th><th>PSNR vs bf16, dB</th></tr>{adh}</table>
<h2>Measured sensitivity (1 - cosine of the component's output, quantized alone)</h2><table>{sens}</table>
<h2>The plan</h2><pre>{e(render(plan_table(plan)))}</pre>
<h2>Profile</h2><pre>{e(render(profile_table(prof)))}</pre>
{flux}
<h2>Timings (s)</h2><pre>{e(json.dumps(timings, indent=1))}</pre>
</body></html>
""")
