#!/usr/bin/env bash
# Where does loading an AOTInductor CUDA package crash? (issue 11; an H100, 2026-11-26: signal 11 inside
# `aoti_load_package`, once in the process that had just compiled the package, once in a fresh process
# at the pipeline's first call, see benchmarks/results/h100/streaming-2026-11-26/aot-test-crash.txt.)
# Two tiny packages taking (weights list, inputs list) as tierquant's block packages do, then loads in
# fresh processes: one alone, both kept alive and called in turn (the pipeline's pattern), with an
# explicit device index, and with input checks on. No wheels needed: plain torch.
#   OUT=... bash benchmarks/aoti_probe.sh        (prints a line per step; a missing "ran" line is a crash)
set -u
export PYTHONFAULTHANDLER=1 PYTHONUNBUFFERED=1
OUT=${OUT:-aoti-probe}; mkdir -p "$OUT" /tmp/probe
cat > /tmp/probe/mk.py <<'PY'
import time, torch
class A(torch.nn.Module):
    def forward(self, ws, xs): return (torch.relu(xs[0] @ ws[0]) * ws[1],)
class B(torch.nn.Module):
    def forward(self, ws, xs): return (torch.sigmoid(xs[0] @ ws[0]), xs[1] + 1)
w = [torch.randn(64, 64, device="cuda", dtype=torch.bfloat16), torch.randn(64, device="cuda", dtype=torch.bfloat16)]
x = [torch.randn(8, 64, device="cuda", dtype=torch.bfloat16), torch.randn(8, device="cuda")]
torch.save({"w": w, "x": x}, "/tmp/probe/io.pt")
for M, d in ((A, "a"), (B, "b")):
    t = time.time()
    ep = torch.export.export(M(), (w, x), strict=False)
    torch._inductor.aoti_compile_and_package(ep, package_path=f"/tmp/probe/{d}.pt2")
    print("compiled", d, round(time.time() - t, 1), flush=True)
PY
cat > /tmp/probe/ld.py <<'PY'
import sys, torch
io, models = torch.load("/tmp/probe/io.pt"), {}
for step in sys.argv[1:]:  # "a": load and run a; "a0": load with device_index=0; "=a": run the loaded a again
    d = step.strip("=0")
    if not step.startswith("="):
        kw = {"device_index": 0} if step.endswith("0") else {}
        models[d] = torch._inductor.aoti_load_package(f"/tmp/probe/{d}.pt2", **kw)
        print("loaded", step, flush=True)
    out = models[d](io["w"], io["x"])
    torch.cuda.synchronize()
    print("ran", step, [tuple(o.shape) for o in out], flush=True)
PY
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  timeout 240 python3 /tmp/probe/mk.py 2>&1 | grep -v Warning | tail -20; echo "compile: exit ${PIPESTATUS[0]}"
  for steps in "a" "b" "a b =a =b" "a0 b0 =a0" "b a =b"; do
    timeout 60 python3 /tmp/probe/ld.py $steps 2>&1 | grep -v Warning | tail -12; echo "[$steps]: exit ${PIPESTATUS[0]}"
  done
  AOTI_RUNTIME_CHECK_INPUTS=1 timeout 60 python3 /tmp/probe/ld.py a b =a 2>&1 | grep -v Warning | tail -12; echo "[checked a b =a]: exit ${PIPESTATUS[0]}"
} 2>&1 | tee "$OUT/aoti-probe.txt"
