#!/usr/bin/env bash
# Where does loading an AOTInductor CUDA package crash? (issue 11.) On an H100 (torch 2.11.0+cu130,
# driver 580.159.04, 2026-11-26) every load of a tiny CUDA package crashed with signal 11 inside
# `aoti_load_package`, alone or with others, with or without device_index or input checks
# (benchmarks/results/h100/aoti-probe-2026-11-26/first.txt). This narrows it down, each step in a fresh
# process: the package's metadata alone, the C++ loader alone, a CPU package, the single-threaded
# runner, the legacy .so path (`aot_compile` + `aot_load`), and the last shared objects opened before the
# crash (LD_DEBUG). No wheels needed: plain torch.
#   OUT=... bash benchmarks/aoti_probe.sh        (a step without its "ok" line crashed)
set -u
export PYTHONFAULTHANDLER=1 PYTHONUNBUFFERED=1
OUT=${OUT:-aoti-probe}; mkdir -p "$OUT" /tmp/probe
cat > /tmp/probe/mk.py <<'PY'
import time, torch
class A(torch.nn.Module):
    def forward(self, ws, xs): return (torch.relu(xs[0] @ ws[0]) * ws[1],)
for dev in ("cuda", "cpu"):
    w = [torch.randn(64, 64, device=dev), torch.randn(64, device=dev)]
    x = [torch.randn(8, 64, device=dev)]
    torch.save({"w": w, "x": x}, f"/tmp/probe/io-{dev}.pt")
    t = time.time()
    ep = torch.export.export(A(), (w, x), strict=False)
    torch._inductor.aoti_compile_and_package(ep, package_path=f"/tmp/probe/a-{dev}.pt2")
    print("compiled", dev, round(time.time() - t, 1), flush=True)
    if dev == "cuda":  # the legacy path: a bare shared object, no package loader
        so = torch._inductor.aot_compile(ep.module(), (w, x))
        open("/tmp/probe/so-path", "w").write(so if isinstance(so, str) else so[0])
        print("compiled .so", so, flush=True)
PY
cat > /tmp/probe/ld.py <<'PY'
import sys, torch
how, dev = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cuda"
io, path = torch.load(f"/tmp/probe/io-{dev}.pt"), f"/tmp/probe/a-{dev}.pt2"
if how == "metadata":
    print(torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(path, "model")); print("ok", how); sys.exit()
if how == "cpp":
    m = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1); print("constructed", flush=True)
    out = m.boxed_run([*io["w"], *io["x"]]) if hasattr(m, "boxed_run") else None
elif how == "single":
    m = torch._inductor.aoti_load_package(path, run_single_threaded=True); out = m(io["w"], io["x"])
elif how == "legacy":
    m = torch._export.aot_load(open("/tmp/probe/so-path").read(), "cuda"); print("constructed", flush=True)
    out = m(io["w"], io["x"])
else:
    m = torch._inductor.aoti_load_package(path); out = m(io["w"], io["x"])
if dev == "cuda": torch.cuda.synchronize()
print("ok", how, dev, flush=True)
PY
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; g++ --version | head -1; ldd --version | head -1
  timeout 300 python3 /tmp/probe/mk.py 2>&1 | grep -v Warning | tail -8; echo "compile: exit ${PIPESTATUS[0]}"
  for step in "metadata cuda" "default cpu" "default cuda" "cpp cuda" "single cuda" "legacy cuda"; do
    timeout 90 python3 /tmp/probe/ld.py $step 2>&1 | grep -v Warning | grep -v "^  File\|^Extension\|^$\|^Thread\|^Current" | tail -5
    echo "[$step]: exit ${PIPESTATUS[0]}"
  done
  LD_DEBUG=files timeout 90 python3 /tmp/probe/ld.py default cuda 2>&1 | grep -E "calling init|file=" | tail -12; echo "[LD_DEBUG default cuda]"
} 2>&1 | tee "$OUT/aoti-probe.txt"
