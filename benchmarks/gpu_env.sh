# Sourced by the GPU job scripts (gpu.sh, partial_residency.sh, multi_gpu.sh): the lent machine has no
# network, so the carried wheels (.whl, from ../shared/gpu/wheels.sh) go to /tmp/site, and $OUT exists.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
