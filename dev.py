#!/usr/bin/env python3
"""One-step set-up and entry point for a fresh machine that has only python3.

    python3 dev.py demo [--out DIR]   # create .venv, install .[demo], run `tierquant demo`
    python3 dev.py test [PYTEST ARGS] # create .venv, install .[test,demo], run the test suite

torch is installed first where the venv lacks it: a CUDA machine gets the default
build from PyPI, a machine without a GPU gets torch==2.13.0 (a CPU build where the
local index has one), so that GPU users are never pinned to a CPU build.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("TIERQUANT_VENV", ROOT / ".venv"))
PY = VENV / "bin" / "python"


def sh(*args, **kw):
    print("+", " ".join(map(str, args)), flush=True)
    subprocess.run(list(map(str, args)), check=True, **kw)


def has(module: str) -> bool:
    return subprocess.run([PY, "-c", f"import {module}"], capture_output=True).returncode == 0


# What each command installs: the demo needs the embedded pipeline's text encoder (the `demo` extra);
# the tests exercise the demo too.
EXTRAS = {"demo": "demo", "test": "test,demo", "setup": "test,demo"}


def setup(extras: str = "test,demo") -> None:
    if not PY.exists():
        sh(sys.executable, "-m", "venv", VENV)
    pip = [PY, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if not has("torch"):
        gpu = shutil.which("nvidia-smi") is not None
        sh(*pip, "torch" if gpu else "torch==2.13.0")
    stamp = VENV / f".tierquant-installed-{extras.replace(',', '-')}"
    if not stamp.exists() or stamp.stat().st_mtime < (ROOT / "pyproject.toml").stat().st_mtime:
        sh(*pip, "-e", f"{ROOT}[{extras}]")
        stamp.touch()


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    cmd, rest = sys.argv[1], sys.argv[2:]
    setup(EXTRAS[cmd])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if cmd == "demo":
        return subprocess.run([VENV / "bin" / "tierquant", "demo", *(rest or ["--out", "demo-out"])], env=env).returncode
    if cmd == "test":
        return subprocess.run([PY, "-m", "pytest", "-q", *rest], cwd=ROOT, env=env).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
