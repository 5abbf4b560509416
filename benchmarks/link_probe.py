#!/usr/bin/env python3
"""The host link as a streamed plan sees it (CUDA): pinned host-to-device copies of a block's size,
one after another for a few seconds, alone and then beside matmuls on the compute stream, each copy
timed by CUDA events. Prints one JSON line: the rate's median, slowest and fastest copies (GB/s), so
a job can tell a steady link from one that others share (run it at a job's start and end).

    python3 benchmarks/link_probe.py [--mib 256] [--seconds 4]
"""
import argparse
import json
import time

import torch


def copies(src: torch.Tensor, dst: torch.Tensor, seconds: float, busy: bool) -> list[float]:
    side = torch.cuda.Stream()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        if busy:
            for _ in range(4):
                a @ a  # ~1.4 ms each on an H100: the compute stream stays busy under the copy
        with torch.cuda.stream(side):
            b, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            b.record()
            dst.copy_(src, non_blocking=True)
            e.record()
        e.synchronize()
        rates.append(src.numel() / 1e6 / b.elapsed_time(e))
    torch.cuda.synchronize()
    return sorted(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    n = args.mib << 20
    src = torch.randint(0, 255, (n,), dtype=torch.uint8).pin_memory()
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst.copy_(src)
    out = {"card": torch.cuda.get_device_name(0), "mib": args.mib}
    for name, busy in (("alone", False), ("beside_matmuls", True)):
        r = copies(src, dst, args.seconds, busy)
        out[name] = {"copies": len(r), "gbps_median": round(r[len(r) // 2], 1), "gbps_slowest": round(r[0], 1),
                     "gbps_fastest": round(r[-1], 1), "gbps_p10": round(r[len(r) // 10], 1)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
