#!/usr/bin/env bash
# The multi-GPU job in one command, on a lent machine with two or more GPUs (no network; carry .whl):
#   bash benchmarks/multi_gpu.sh                 (every GPU there)
#   DEVICES=0,1 SIZES=256,1024 bash benchmarks/multi_gpu.sh [multi_gpu.py args...]
# It runs the 2-GPU tests, then benchmarks/multi_gpu.py, and leaves $OUT/<card>x<N>/frontier.json (+ .md,
# .png): copy that folder to benchmarks/results/ and commit it.
. "$(dirname "$0")/gpu_env.sh"
N=$(python3 -c "import torch; print(torch.cuda.device_count())")
DEVICES=${DEVICES:-$(python3 -c "print(','.join(map(str, range($N))))")}
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
nvidia-smi topo -m >> "$OUT/card.txt" 2>&1
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  TIERQUANT_FAILURES=$OUT/failures.txt timeout ${TEST_TIMEOUT:-600} python3 -m pytest -q -p no:cacheprovider -rfE \
    --tb=short -m gpu tests/test_multiapply.py > "$OUT/pytest.log" 2>&1; tail -5 "$OUT/pytest.log"
fi
python3 benchmarks/multi_gpu.py --devices "$DEVICES" --sizes "${SIZES:-256,1024}" --out "$OUT/bench" "$@"
cp "$OUT/bench/rows.jsonl" "$OUT/rows.jsonl" 2>/dev/null
tar czf "$OUT/logs.tar.gz" -C "$OUT/bench" logs plans 2>/dev/null
CARD=$(python3 -c "from tierquant.hardware import detect; print(detect().name)")
COUNT=$(python3 -c "print(len('$DEVICES'.split(',')))")
python3 benchmarks/multi_gpu.py --report "$OUT/rows.jsonl" --out "$OUT/${CARD}x${COUNT}"
rm -rf "$OUT/bench"
