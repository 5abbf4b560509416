"""benchmarks/multi_gpu.py on a CPU: its arguments, its plans and its report (the runs need GPUs)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
_spec = importlib.util.spec_from_file_location("multi_gpu", BENCH / "multi_gpu.py")
multi_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(multi_gpu)


@pytest.mark.parametrize("argv, message", [
    (["--devices", "0"], "at least two --devices"),
    (["--devices", "0,0"], "each card once"),
    (["--devices", "0,1", "--sizes", "250"], "multiples of 16"),
    (["--devices", "0,a"], "CUDA device indices"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
    assert multi_gpu.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() >= 8, reason="has the GPUs")
def test_missing_gpus_are_refused(capsys):
    assert multi_gpu.main(["--devices", ",".join(map(str, range(8)))]) == 2
    assert "needs that many CUDA GPUs" in capsys.readouterr().err


def test_strategies_and_plans(monkeypatch):
    from tierquant import hardware
    from tierquant.hardware import target

    assert multi_gpu.strategies(4) == ["one-card", "tiered", "cards", "ulysses:2", "ring:2", "ulysses:4", "ring:4"]
    monkeypatch.setattr(hardware, "detect_cards", lambda: [target("h100")] * 4)
    p = multi_gpu.make_plan("ulysses:4", 1024, None, None, [0, 1, 2, 3])
    assert p.parallel["kind"] == "ulysses" and p.parallel["degree"] == 4
    one = multi_gpu.make_plan("one-card", 1024, None, None, [0, 1, 2, 3])
    assert not one.devices and one.predicted_latency_s > p.predicted_latency_s


def test_report_writes_the_frontier(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"pipeline": "flux-dev", "budget_gib": None, "strategy": "tiered 1024px",
                                "seconds_per_image": 1.5, "peak_reserved_bytes": 30 << 30, "setup_s": 60,
                                "predicted_latency_s": 1.3, "oom": False, "card": "NVIDIA H200", "devices": 4}) + "\n")
    assert multi_gpu.main(["--report", str(rows), "--out", str(tmp_path / "h200x4")]) == 0
    assert json.loads((tmp_path / "h200x4" / "frontier.json").read_text())["rows"][0]["devices"] == 4
