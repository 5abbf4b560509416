#!/usr/bin/env bash
# The recorded user's path on the lent machine (no network): install the carried wheels, then
# benchmarks/user_path.py under a hard limit (LIMIT s), so that rows, logs and plans always come back.
# $OUT gets at most 5 files: card.txt, user-path.json, user-path.md, logs.tar.gz, run.log.
#   OUT=... bash benchmarks/user_path.sh --pipelines flux-dev --budgets 24 --deadline 240     (carry .whl)
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src
OUT=${OUT:-user-path-out} WORK=${WORK:-/tmp/tq-user-path}
mkdir -p "$OUT" "$WORK"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers, torchao, bitsandbytes, transformers; print(torch.__version__, diffusers.__version__, torchao.__version__, bitsandbytes.__version__, transformers.__version__)"
  nproc; free -g; df -h "$WORK"; } 2>&1 | tee "$OUT/card.txt"
# SIGTERM at LIMIT: user_path.py kills its running child's process group and exits; rows already written stay.
timeout -k 30 "${LIMIT:-560}" python3 benchmarks/user_path.py --out "$OUT" --workdir "$WORK" "$@" 2>&1 | tee "$OUT/run.log"
tar czf "$OUT/logs.tar.gz" -C "$WORK" logs 2>/dev/null
[ -f "$OUT/user-path.json" ] && python3 benchmarks/user_path.py --report "$OUT/user-path.json" | tee "$OUT/user-path.md"
