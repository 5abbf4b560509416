"""The pure parts of benchmarks/user_path.py: rows, what to skip, the Markdown report."""
import importlib.util
import json
from pathlib import Path

import pytest

GiB = 1024**3


@pytest.fixture(scope="module")
def up():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "user_path.py"
    spec = importlib.util.spec_from_file_location("user_path", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


METRICS = {"load_s": 41.5, "apply_s": None, "generation_s": [150.2, 2.9, 2.8, 3.0], "first_image_s": 150.2,
           "seconds_per_image": 2.9, "images": 4, "peak_reserved_bytes": 21 * GiB, "host_peak_rss_bytes": 30 * GiB,
           "card": "NVIDIA H100 80GB HBM3", "plan": "/tmp/plan-24.json", "budget_bytes": 24 * GiB,
           "date": "2026-01-02"}


def plan_json(host_bytes=None):
    d = {"format": "tierquant-plan", "version": 1, "predicted_latency_s": 3.1, "predicted_peak_bytes": 20 * GiB,
         "components": {"transformer": {"scheme": "fp8-dynamic", "placement": "resident", "compile": True},
                        "text_encoder_2": {"scheme": "nf4", "placement": "swapped", "compile": False}},
         "pipeline": {"class": "FluxPipeline",
                      "components": {"transformer": {"class": "F", "params": 11_900_000_000},
                                     "text_encoder_2": {"class": "T5", "params": 4_760_000_000}}}}
    if host_bytes is not None:
        d["host_bytes"] = host_bytes
    return d


def test_row_has_exactly_the_keys_and_takes_metrics_and_peaks(up):
    row = up.make_row("flux-dev", 24, "first", METRICS, {"anon": 18 * GiB, "hwm": 31 * GiB, "tree_anon": 19 * GiB},
                      plan_json(), card="fallback card", wall_s=200.0)
    assert set(up.KEYS) <= set(row)
    assert (row["pipeline"], row["budget_gib"], row["process"]) == ("flux-dev", 24, "first")
    assert row["load_s"] == 41.5 and row["apply_s"] is None and row["seconds_per_image"] == 2.9
    assert row["first_image_s"] == 150.2 and row["peak_reserved_bytes"] == 21 * GiB
    assert row["host_peak_rss_bytes"] == 30 * GiB  # the run's own VmHWM wins over our sampled one
    assert row["host_peak_anon_bytes"] == 18 * GiB
    assert row["card"] == "NVIDIA H100 80GB HBM3" and row["date"] == "2026-01-02"
    assert row["largest_component_bf16_bytes"] == 23_800_000_000
    assert row["plan"]["transformer"] == "fp8-dynamic/resident+compile"
    assert row["wall_s"] == 200.0 and row["images"] == 4
    # The plan has no host_bytes yet: no check can be made.
    assert "plan_host_bytes" not in row and "host_check_ok" not in row
    assert json.loads(json.dumps(row)) == row  # the rows file is JSON


def test_host_check(up):
    peaks = {"anon": 26 * GiB, "hwm": 27 * GiB}
    good = up.make_row("flux-dev", 24, "first", METRICS, peaks, plan_json(host_bytes=2 * GiB))
    limit = 23_800_000_000 + 2 * GiB + 2 * GiB  # ~26.2 GiB
    assert good["plan_host_bytes"] == 2 * GiB and good["host_limit_bytes"] == limit and good["host_check_ok"] is True
    bad = up.make_row("flux-dev", 24, "first", METRICS, peaks, plan_json(host_bytes=0))
    assert bad["host_check_ok"] is False


def test_row_without_metrics_falls_back_to_sampled_peaks(up):
    row = up.make_row("sd3.5-large", 12, "second", None, {"anon": 5 * GiB, "hwm": 9 * GiB}, None, card="H200",
                      error="exit 1: torch.OutOfMemoryError", oom=True)
    assert row["host_peak_rss_bytes"] == 9 * GiB and row["card"] == "H200" and row["seconds_per_image"] is None
    assert row["oom"] is True and not up.ok(row)


def test_skip_existing(up):
    done = lambda b, p: up.make_row("flux-dev", b, p, METRICS, {"anon": GiB})  # noqa: E731
    rows = [done(24, "first"), done(24, "second"), done(16, "first"),
            up.make_row("flux-dev", 12, "first", None, {}, error="timed out after 900 s")]
    assert up.todo(rows, "flux-dev", 24, plan_here=False) == []
    # Only the second is missing: run it alone where the first's plan (and caches) are, else both again.
    assert up.todo(rows, "flux-dev", 16, plan_here=True) == ["second"]
    assert up.todo(rows, "flux-dev", 16, plan_here=False) == ["first", "second"]
    assert up.todo(rows, "flux-dev", 12, plan_here=True) == ["first", "second"]  # a failed first is retried
    assert up.todo(rows, "sd3.5-large", 24, plan_here=True) == ["first", "second"]
    oom = up.make_row("flux-dev", 16, "second", METRICS, {}, oom=True)
    up.put(rows, oom)  # replaces nothing: there was no 16/second row
    assert len(rows) == 5 and up.todo(rows, "flux-dev", 16, plan_here=True) == ["second"]
    up.put(rows, done(16, "second"))  # replaces the OOM row
    assert len(rows) == 5 and up.todo(rows, "flux-dev", 16, plan_here=True) == []


def test_runs_after_tierquant_compile_sit_beside_the_others(up):
    plain = up.make_row("flux-dev", 24, "first", METRICS, {"anon": GiB})
    compiled = up.make_row("flux-dev", 24, "first", METRICS, {"anon": GiB}, compile_mode="aot", compile_s=672.4)
    rows = [plain]
    up.put(rows, compiled)
    assert rows == [plain, compiled]
    assert up.todo(rows, "flux-dev", 24, plan_here=True) == ["second"]
    assert up.todo(rows, "flux-dev", 24, plan_here=True, compiled=True) == ["second"]
    up.put(rows, up.make_row("flux-dev", 24, "second", METRICS, {"anon": GiB}, compile_mode="aot"))
    assert up.todo(rows, "flux-dev", 24, plan_here=True, compiled=True) == []
    assert up.todo(rows, "flux-dev", 24, plan_here=True) == ["second"]
    assert "| aot, 672.4 s |" in up.report(rows)


def test_report_table(up):
    rows = [up.make_row("flux-dev", 24, "first", METRICS, {"anon": 18 * GiB}, plan_json(host_bytes=2 * GiB)),
            up.make_row("flux-dev", 12, "first", None, {"anon": 3 * GiB}, card="NVIDIA H100 80GB HBM3",
                        error="exit 1: torch.OutOfMemoryError: CUDA out of memory", oom=True)]
    md = up.report(rows).splitlines()
    assert md[0].startswith("| pipeline | budget GiB | process | tierquant compile | load s | first image s | s/image |")
    assert md[1] == "|" + "---|" * 12
    assert md[2] == "| flux-dev | 24 | first | - | 41.5 | 150.2 | 2.90 | 21.0 | 30.0 | 18.0 | ok (< 26.2) | - |"
    assert md[3] == "| flux-dev | 12 | first | - | - | - | OOM | - | - | 3.0 | - | - |"
    assert "NVIDIA H100 80GB HBM3" in md[-1]


def test_compile_step_reads_the_reports_mode_through_noise_and_says_when_it_failed(up, tmp_path, monkeypatch):
    """`--compile` runs `tierquant compile PLAN --json` and records its wall time and the report's mode
    (the last JSON object printed, whatever warnings come before it), or the error it ended with."""
    import argparse
    import os
    import sys

    report = {"mode": "aot", "components": {"transformer": {"mode": "aot"}}, "notes": []}
    say = f"import json, sys; print('warning: {{not json}}'); print(json.dumps({report!r}, indent=1)); sys.exit(0)"
    monkeypatch.setattr(up, "CLI", [sys.executable, "-c", say])
    args = argparse.Namespace(dry_run=False, timeout=60, packages=None)
    got = up._compile(tmp_path / "p.json", tmp_path / "ckpt", tmp_path / "c.log", args, dict(os.environ))
    assert got["compile_mode"] == "aot" and got["compile_s"] >= 0 and "compile_error" not in got
    monkeypatch.setattr(up, "CLI", [sys.executable, "-c", "import sys; print('error: no GPU'); sys.exit(2)"])
    got = up._compile(tmp_path / "p.json", tmp_path / "ckpt", tmp_path / "c.log", args, dict(os.environ))
    assert got["compile_mode"] is None and got["compile_error"].startswith("exit 2")
