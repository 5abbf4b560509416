#!/usr/bin/env bash
# The partial-residency frontier (one GPU job, no network; carry .whl): tiered plans at every budget,
# then what a diffusers user would try at the small ones, each (budget, strategy) in a fresh process
# under a hard cap. Rows are appended to $OUT/bench/rows.jsonl as each run ends, so a job cut short
# keeps what it finished.
#   OUT=... bash benchmarks/partial_residency.sh [--pipelines flux-dev] [--budgets none,12,8,6,16] [--baselines 12,8]
set -u
PIPELINES=flux-dev BUDGETS=none,12,8,6,16 BASELINES=12,8 DEADLINE=${DEADLINE:-0}
while [ $# -gt 0 ]; do
  case "$1" in
    --pipelines) PIPELINES=$2; shift 2;; --budgets) BUDGETS=$2; shift 2;; --baselines) BASELINES=$2; shift 2;;
    *) echo "unknown option $1"; exit 2;;
  esac
done
. "$(dirname "$0")/gpu_env.sh"
mkdir -p "$OUT/bench"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
python3 -c "import torch, diffusers, torchao; print(torch.__version__, diffusers.__version__, torchao.__version__)" | tee -a "$OUT/card.txt"
python3 benchmarks/frontier.py --out "$OUT/bench" --pipelines "$PIPELINES" --budgets "$BUDGETS" --strategies tiered \
  --timeout 720 --deadline "$DEADLINE"
[ -n "$BASELINES" ] && python3 benchmarks/frontier.py --out "$OUT/bench" --pipelines "$PIPELINES" --budgets "$BASELINES" \
  --strategies diffusers-nf4,diffusers-fp8-offload --timeout 600 --images 2
echo DONE
