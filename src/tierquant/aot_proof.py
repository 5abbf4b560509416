"""Proving ahead-of-time packages in a fresh process before this one loads them.

Loading an AOTInductor package died with signal 11 on H100s (torch 2.11, 2026-11-26), whatever the
package (docs/compile.md). A crash in native code cannot be caught,
and it would take the user's pipeline with it. So `compilation.prepare` first has a child process load
every package of the plan together and call each in turn, twice, as a pipeline does. Only if the
child finishes, and each package's output matches the eager block's, are the packages installed and
kept. Otherwise they are deleted, and the components compile just in time, with the reason given.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import aot as A

# The child: load all, then call each in turn, twice (a later load must not break an earlier package).
CHILD = """
import sys, torch
from tierquant.aot import Runner, tensors_of
cases = torch.load(sys.argv[1], weights_only=False)
models = [Runner(path) for path, _ in cases]
with torch.no_grad():
    for _ in range(2):
        outs = [tensors_of(m.run(flat)) for m, (_, flat) in zip(models, cases)]
torch.save([[o.cpu() for o in out] for out in outs], sys.argv[2])
print("PROVEN", flush=True)
"""
TIMEOUT_S = 600


@dataclass
class Case:
    package: Path
    flat: list[torch.Tensor]  # the block's weights then its inputs, as the package takes them
    reference: list[torch.Tensor]  # the eager block's outputs


def case(example: A.Example, package) -> Case:
    """What proving `package` needs: `example`'s flat inputs and the eager block's outputs on them."""
    layout = A.Layout(example.block)
    _, tensors = A.input_spec(example.args, example.kwargs)
    with torch.no_grad(), A.eager(example.block):
        ref = example.block(*example.args, **example.kwargs)
    flat = layout.tensors(example.block) + [A.dense_one(t) for t in tensors]
    return Case(Path(package), flat, [t.detach() for t in A.tensors_of(ref)])


def exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"died with signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"died with signal {-code}"
    return f"exited with status {code}"


def prove(cases: list[Case], timeout: float = TIMEOUT_S) -> tuple[list[float], str | None]:
    """Run every case's package on its inputs in one fresh process. Returns (relative L2 error of
    each package's outputs against its reference, None), or ([], why not) when the process failed."""
    if not cases:
        return [], None
    with tempfile.TemporaryDirectory(prefix="tierquant-proof-") as d:
        inputs, outputs = Path(d) / "inputs.pt", Path(d) / "outputs.pt"
        torch.save([(str(c.package), c.flat) for c in cases], inputs)
        # the child imports tierquant from where this process did, installed or not
        here = str(Path(A.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONFAULTHANDLER": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
        try:
            proc = subprocess.run([sys.executable, "-c", CHILD, str(inputs), str(outputs)],
                                  capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return [], f"a fresh process loading the AOT packages did not finish in {timeout:.0f} s"
        if proc.returncode != 0 or "PROVEN" not in proc.stdout:
            last = next((l for l in reversed(proc.stderr.strip().splitlines())
                         if l.strip() and not l.startswith(" ")), "")
            return [], (f"a fresh process loading the AOT packages {exit_reason(proc.returncode)}"
                        + (f" ({last.strip()[:200]})" if last else ""))
        outs = torch.load(outputs, weights_only=False)
    return [A.rel_error(o, c.reference) for o, c in zip(outs, cases)], None


def discard(package) -> None:
    """Delete a package and its description, wherever it was put (the cache, beside the plan)."""
    package = Path(package)
    package.unlink(missing_ok=True)
    package.with_suffix(".json").unlink(missing_ok=True)
