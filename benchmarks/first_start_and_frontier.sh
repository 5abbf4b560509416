#!/usr/bin/env bash
# One machine's job (carry .whl): where a process's first image goes (first_call.py, with PROBE_ARGS,
# by default the JIT path with dynamo's timers and a cProfile of each process), the streamed-FP8 and
# graph-package GPU tests, then frontier runs, each argument "PIPELINE BUDGETS [STRATEGIES]" one
# frontier call (strategies default to tiered), in order, while the deadline allows. Everything lands
# in $OUT as it ends (poll it in back-to-back calls: an idle machine goes back after 30 s, a held one
# after 30 minutes).
#   OUT=/tmp/r2 DEADLINE_S=1380 setsid nohup bash benchmarks/first_start_and_frontier.sh \
#       "flux-dev 12,6,none,8" "flux-dev 12" &
# TRACE=1 adds a profiler trace of one short image to each run (frontier.py --trace, copy_trace.py).
# PROFILES=DIR starts from the GPU profiles in DIR (profile-PIPELINE.json, from an earlier machine of the
# same kind) instead of measuring them; TESTS_K selects the GPU tests (pytest -k), TESTS_AFTER=1 runs them last; the host link is
# probed (link_probe.py) before the tests and after the last frontier call.
# Run on an H100 on 2026-11-26 (night) as "sd3.5-large none,12,8" "flux-dev 12,6,none": the probe
# failed, SD3.5-large ran, flux-dev was skipped at the deadline (benchmarks/results/h100/night-2026-11-26).
. "$(dirname "$0")/gpu_env.sh"
start=$(date +%s); left() { echo $(( ${DEADLINE_S:-1380} - ($(date +%s) - start) )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/card.txt"
# The card's clocks, power and throttle reasons every CLOCKS_MS ms (500) for the whole job: a stretch of slow steps
# with no wait for copies (docs/frontier.md, 2026-12-06) is either the GPU running slower or the host.
# (newer drivers name the reasons clocks_event_reasons, older ones clocks_throttle_reasons)
q=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu
for reasons in clocks_event_reasons.active clocks_throttle_reasons.active; do
  nvidia-smi --query-gpu=$q,$reasons --format=csv -c 1 > /dev/null 2>&1 && { q=$q,$reasons; break; }
done
nvidia-smi --query-gpu=$q --format=csv -lms ${CLOCKS_MS:-500} > "$OUT/clocks.csv" 2>&1 &
clocks=$!
python3 -c "import torch, diffusers, torchao; print(torch.__version__, diffusers.__version__, torchao.__version__)" >> "$OUT/card.txt"
python3 benchmarks/link_probe.py --seconds 3 > "$OUT/link.jsonl" 2>&1
[ "${SKIP_PROBE:-0}" = 1 ] || python3 benchmarks/first_call.py --out "$OUT/first-call" \
  ${PROBE_ARGS:---paths jit --double 2 --single 2 --processes 1 --profile} > "$OUT/first-call.log" 2>&1
gpu_tests() {
  [ "${SKIP_TESTS:-0}" = 1 ] || timeout 300 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -m gpu \
    tests/test_gpu.py tests/test_compile.py -k "${TESTS_K:-streamed_fp8 or (aot_packages and graph)}" > "$OUT/pytest.log" 2>&1
}
[ "${TESTS_AFTER:-0}" = 1 ] || gpu_tests  # TESTS_AFTER=1: after the frontier calls, so a short machine still gives rows
# USER_PATH="flux-dev,sd3.5-large": the user's path at 24 GiB first (a cold first process, then a second)
[ -z "${USER_PATH:-}" ] || python3 benchmarks/user_path.py --out "$OUT/user-path" --workdir /tmp/tq-user-path \
  --pipelines "$USER_PATH" --budgets 24 --deadline $(( $(left) - 400 )) > "$OUT/user-path.log" 2>&1
n=0
for job in "${@:-flux-dev 12,6,none,8}"; do
  set -- $job
  n=$((n + 1))
  [ "$(left)" -gt 200 ] || break
  mkdir -p "$OUT/bench-$n"  # the pipeline's GPU profile from an earlier call, if any: not measured again
  for f in "${PROFILES:-/nonexistent}/profile-$1.json" "$OUT"/bench-*/profile-"$1".json; do
    [ -f "$f" ] && cp "$f" "$OUT/bench-$n/" && break
  done
  python3 benchmarks/frontier.py --out "$OUT/bench-$n" --pipelines "$1" --budgets "$2" --strategies "${3:-tiered}" \
    --timeout 600 --deadline $(( $(left) - 200 )) ${TRACE:+--trace} >> "$OUT/frontier.log" 2>&1
done
python3 benchmarks/link_probe.py --seconds 3 >> "$OUT/link.jsonl" 2>&1
[ "${TESTS_AFTER:-0}" != 1 ] || gpu_tests
# the layer timings the plans were priced with, and the flags of those estimated instead (calibrate.py)
cp -r "${TIERQUANT_CACHE:-$HOME/.cache/tierquant}/timings" "$OUT/timings-cache" 2>/dev/null
kill $clocks 2>/dev/null
echo ALL_DONE >> "$OUT/frontier.log"
