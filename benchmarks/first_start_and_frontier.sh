#!/usr/bin/env bash
# One machine's job (H100, 2026-11-26, night): where the first image's time goes per start path
# (first_call.py), the streamed-FP8 and package GPU tests, then the partial-residency frontier for
# SD3.5-large (none, 12, 8 GiB) and flux-dev (12, 6 GiB, unlimited). Everything lands in $OUT as it ends.
#   OUT=/tmp/r2 DEADLINE_S=1380 setsid nohup bash benchmarks/first_start_and_frontier.sh &   (carry .whl)
. "$(dirname "$0")/gpu_env.sh"
start=$(date +%s); left() { echo $(( ${DEADLINE_S:-1380} - ($(date +%s) - start) )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/card.txt"
python3 benchmarks/first_call.py --out "$OUT/first-call" --paths jit,graph > "$OUT/first-call.log" 2>&1
timeout 300 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -m gpu tests/test_gpu.py tests/test_compile.py \
  -k "streamed_fp8 or aot_packages" > "$OUT/pytest.log" 2>&1
for job in "sd3.5-large none,12,8" "flux-dev 12,6,none"; do
  set -- $job
  [ "$(left)" -gt 200 ] || break
  python3 benchmarks/frontier.py --out "$OUT/bench" --pipelines "$1" --budgets "$2" --strategies tiered \
    --timeout 600 --deadline $(( $(left) - 200 )) >> "$OUT/frontier.log" 2>&1
done
echo ALL_DONE >> "$OUT/frontier.log"
