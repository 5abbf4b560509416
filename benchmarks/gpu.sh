#!/usr/bin/env bash
# Everything one GPU call needs, on the lent machine (no network): install the carried wheels, run the
# GPU tests, then the frontier benchmark with a deadline. Results go to $OUT (at most 8 files).
#   bash benchmarks/gpu.sh [frontier args...]        (carry .whl)
#   TESTS_ONLY=1 bash benchmarks/gpu.sh              (the GPU tests alone)
. "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
python3 -c "import torch, diffusers, torchao, bitsandbytes, transformers; print(torch.__version__, diffusers.__version__, torchao.__version__, bitsandbytes.__version__, transformers.__version__)" | tee -a "$OUT/card.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  TIERQUANT_FAILURES=$OUT/failures.txt timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q -p no:cacheprovider -p no:logging -rfE --tb=short --durations=10 \
    -m gpu tests/ > "$OUT/pytest.log" 2>&1; tail -5 "$OUT/pytest.log"
fi
[ "${TESTS_ONLY:-0}" = 1 ] && exit 0
# Compile artifacts travel between calls in .carry/compile (carried in, sent back as one tarball).
mkdir -p .carry/compile
[ -f .carry/gpu/compile.tar.gz ] && tar xzf .carry/gpu/compile.tar.gz -C .carry
python3 benchmarks/frontier.py --out "$OUT/bench" --artifacts .carry/compile "$@"
tar czf "$OUT/compile.tar.gz" -C .carry compile 2>/dev/null
cp "$OUT/bench/rows.jsonl" "$OUT/rows.jsonl" 2>/dev/null
cp "$OUT"/bench/profile-*.json "$OUT/" 2>/dev/null
tar czf "$OUT/logs.tar.gz" -C "$OUT/bench" logs 2>/dev/null
rm -rf "$OUT/bench"
python3 -c "
import json,sys
for l in open('$OUT/rows.jsonl'):
    r=json.loads(l); sp=r.get('seconds_per_image'); pr=r.get('predicted_latency_s')
    print(f\"{r['pipeline']:10} {str(r.get('budget_gib')):>5} {r['strategy']:22} {('%.2f' % sp) if sp else ('OOM' if r.get('oom') else (r.get('skipped') or r.get('error') or '')[:50]):>10} pred {('%.2f' % pr) if pr else '-':>6} peak {(r.get('peak_reserved_bytes') or 0)/2**30:5.1f} GiB setup {r.get('setup_s') or 0:.0f}s first {r.get('first_image_s') or 0:.0f}s\")
" 2>/dev/null
