"""The benchmark's report path (CPU): committed results are well-formed and re-render."""
import json
from pathlib import Path

import importlib.util

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCH / "results"
_spec = importlib.util.spec_from_file_location("frontier_report", BENCH / "frontier_report.py")
frontier_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(frontier_report)
KEYS, write_report = frontier_report.KEYS, frontier_report.write_report


def test_committed_frontier_rows_have_the_documented_keys():
    files = list(RESULTS.glob("*/frontier.json"))
    assert files
    for f in files:
        rows = json.loads(f.read_text())["rows"]
        assert rows
        for r in rows:
            assert set(KEYS) <= set(r), f"{f}: {set(KEYS) - set(r)}"
            assert r["card"]


def test_report_renders_rows_to_json_and_markdown(tmp_path):
    rows = RESULTS / "h200" / "rows.jsonl"
    write_report([rows], tmp_path)
    md = (tmp_path / "frontier.md").read_text()
    assert "| flux-dev | 24.0 | tiered |" in md
    assert len(json.loads((tmp_path / "frontier.json").read_text())["rows"]) == len(rows.read_text().splitlines())
