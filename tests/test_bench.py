"""The benchmark's report path (CPU): committed results are well-formed and re-render."""
import json
from pathlib import Path

from tierquant.bench_report import KEYS, write_report

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


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
