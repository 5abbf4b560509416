#!/usr/bin/env python3
"""The frontier benchmark (CUDA, no network): see tierquant/bench.py, or `tierquant bench --help`.

On the lent GPU machine (wheels carried in .whl):
    python3 benchmarks/frontier.py --pipelines flux-dev --budgets 24,16,12,8,none --out $OUT
Here, to make the committed table and plot from the rows that came back:
    python3 benchmarks/frontier.py --report benchmarks/results/h100/rows.jsonl --out benchmarks/results/h100
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tierquant.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
