"""A profiler trace of one short generation, and where the host-to-device copy engine sat idle in it.

`frontier.py --trace` runs one more image of a few steps under `torch.profiler` after the timed ones,
keeps the Chrome trace gzipped beside the rows, and puts `summary(trace)` in the row. The question it
answers (docs/frontier.md, 2026-12-06): at 8 GiB Flux's copies kept the link busy only 88% of the
transformer's time while its compute waited 741 ms per image for them, though the copies alone would
have fitted. For each gap between two copies the summary says whether the host issued the next copy
late (`cudaMemcpyAsync` called after the gap began: the host was behind) or early (the copy waited on
the stream: a slot not yet free, or an event).

    trace = record(lambda: pipe(**kw), Path("trace-flux-dev-8.json.gz"))
    summary(trace)   # {"copies": ..., "copy_ms": ..., "gaps": {...}, "largest_gaps": [...]}
"""
from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

GAP_MS = 0.1  # a pause of the copy engine shorter than this is a copy's own setup, not idleness


def record(run, path: Path) -> dict:
    """Run `run()` under the profiler (CPU and CUDA activity), write its Chrome trace gzipped to `path`
    and return the trace as a dict."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        text = raw.read_text()
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.write(text)
    return json.loads(text)


def summary(trace: dict, largest: int = 10) -> dict:
    """The host-to-device copies of a Chrome trace (kineto's `gpu_memcpy` events), the gaps between
    them, and for each gap whether the next copy was issued by the host after the gap began (`late`)
    or before it (`queued`: it waited on its stream). Times in ms."""
    events = [e for e in trace.get("traceEvents", []) if isinstance(e, dict) and e.get("ph") == "X"]
    copies = sorted((e for e in events if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")),
                    key=lambda e: e["ts"])
    # The host's call that issued each copy: kineto links them by correlation id.
    issued = {e["args"]["correlation"]: e["ts"] for e in events
              if e.get("cat") == "cuda_runtime" and "Memcpy" in e.get("name", "") and "correlation" in e.get("args", {})}
    out = {"copies": len(copies), "copy_ms": sum(e["dur"] for e in copies) / 1e3,
           "gaps": {"count": 0, "ms": 0.0, "late": 0, "late_ms": 0.0, "queued": 0, "queued_ms": 0.0, "unknown": 0}}
    if not copies:
        out["largest_gaps"] = []
        return out
    start = copies[0]["ts"]
    out["span_ms"] = (copies[-1]["ts"] + copies[-1]["dur"] - start) / 1e3
    gaps, end = [], copies[0]["ts"] + copies[0]["dur"]
    for e in copies[1:]:
        gap = (e["ts"] - end) / 1e3
        if gap >= GAP_MS:
            when = issued.get(e.get("args", {}).get("correlation"))
            kind = "unknown" if when is None else "late" if when > end else "queued"
            g = out["gaps"]
            g["count"] += 1
            g["ms"] += gap
            g[kind] += 1
            if kind != "unknown":
                g[f"{kind}_ms"] += gap
            gaps.append({"at_ms": round((end - start) / 1e3, 3), "ms": round(gap, 3), "next_copy": kind,
                         "next_copy_mib": round(e.get("args", {}).get("bytes", 0) / 2**20, 1)})
        end = max(end, e["ts"] + e["dur"])
    out["largest_gaps"] = sorted(gaps, key=lambda g: -g["ms"])[:largest]
    return out
