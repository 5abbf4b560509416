"""Turn benchmark rows into frontier.json, a Markdown table and a PNG plot (per card)."""
from __future__ import annotations

import json
from pathlib import Path

GiB = 1024**3
KEYS = ["pipeline", "budget_gib", "strategy", "seconds_per_image", "peak_reserved_bytes", "setup_s",
        "predicted_latency_s", "oom", "card"]


def load_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        text = p.read_text()
        if p.suffix == ".json":
            rows += json.loads(text)["rows"]
        else:
            rows += [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in rows if r.get("strategy") and r.get("strategy") != "profile"]


def _fmt(v, spec="{:.2f}"):
    return "-" if v is None else spec.format(v)


def markdown(rows: list[dict]) -> str:
    lines = ["| pipeline | budget | strategy | s / image | predicted s | peak reserved GiB | setup s | first image s | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {None: 1e9}
    for r in sorted(rows, key=lambda r: (r["pipeline"], order.get(r.get("budget_gib"), r.get("budget_gib") or 0),
                                         r["strategy"])):
        note = "OOM" if r.get("oom") else r.get("skipped") or (r.get("error") or "")[:80] or r.get("how", "")
        if r.get("plan"):
            note = (note + " " if note else "") + ", ".join(f"{k}: {v}" for k, v in r["plan"].items())
        if r.get("note"):
            note += f" ({r['note']})"
        note = " ".join(note.split()).replace("|", "/")
        lines.append(f"| {r['pipeline']} | {r.get('budget_gib') or 'unlimited'} | {r['strategy']} | "
                     f"{_fmt(r.get('seconds_per_image'))} | {_fmt(r.get('predicted_latency_s'))} | "
                     f"{_fmt((r.get('peak_reserved_bytes') or 0) / GiB if r.get('peak_reserved_bytes') else None)} | "
                     f"{_fmt(r.get('setup_s'), '{:.0f}')} | {_fmt(r.get('first_image_s'), '{:.0f}')} | {note} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    for pipeline in sorted({r["pipeline"] for r in rows}):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        sub = [r for r in rows if r["pipeline"] == pipeline and r.get("seconds_per_image")]
        unlimited_x = max([r["budget_gib"] for r in sub if r.get("budget_gib")] + [24]) * 1.5
        for strategy in sorted({r["strategy"] for r in sub}):
            pts = sorted((r.get("budget_gib") or unlimited_x, r["seconds_per_image"]) for r in sub if r["strategy"] == strategy)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=strategy)
        ax.set_xlabel("memory budget, GiB (rightmost: unlimited)")
        ax.set_ylabel("seconds per image")
        ax.set_yscale("log")
        cards = ", ".join(sorted({r["card"] for r in sub}))
        ax.set_title(f"{pipeline} on {cards}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path.with_name(f"{path.stem}-{pipeline}.png") if len({r['pipeline'] for r in rows}) > 1 else path)
        plt.close(fig)
    return True


def write_report(paths: list[Path], out: Path) -> None:
    rows = load_rows(paths)
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    (out / "frontier.md").write_text(markdown(rows))
    plot(rows, out / "frontier.png")
    print(markdown(rows))
