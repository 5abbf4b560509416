"""`tierquant run PLAN --devices 0,1,2,3`: running a plan over several cards.

- A plan with components across cards runs in one process. The plan's card i is CUDA device
  `devices[i]`: a child process sees only those devices (CUDA_VISIBLE_DEVICES, set before torch
  starts CUDA), in that order, and runs `runner.run` as for one card.
- A context-parallel plan runs one process per card, as torchrun would start them (RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR, MASTER_PORT), every device visible to each (NCCL finds NVLink between
  them), each on its own card (`torch.cuda.set_device`). Each joins the NCCL process group, then runs
  `runner.run`, whose apply enables diffusers' context parallelism (`multiapply`). Every rank makes
  the same images from the same seeds; rank 0 prints and saves them (and the metrics), the others
  write to a temporary folder that is removed.
If one process fails, the others are stopped and the run fails with its exit code.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

from .errors import TierquantError
from .plan import Plan

WORKER = "tierquant.launch"
CARD = "TIERQUANT_CARD"


def check(plan: Plan, devices: list[int], visible: int) -> None:
    """Refuse, before starting anything, a device list the plan cannot run on (`visible`: the CUDA
    devices torch sees here)."""
    if plan.parallel:
        need, what = plan.parallel["degree"], f"runs {plan.parallel['component']} over {plan.parallel['degree']} cards"
    else:
        need = max(1, len(plan.devices))
        what = f"is for {need} card{'s' if need != 1 else ''}"
    if len(devices) != need:
        raise TierquantError(f"the plan {what}; --devices names {len(devices)}: give {need} "
                             f"(e.g. --devices {','.join(map(str, range(need)))})")
    if visible == 0:
        raise TierquantError("--devices asks for CUDA GPUs, but torch sees no CUDA GPU here")
    missing = [d for d in devices if d >= visible]
    if missing:
        raise TierquantError(f"--devices names cuda:{', cuda:'.join(map(str, missing))}, but torch sees {visible} "
                             f"CUDA GPU(s) here (0 to {visible - 1})")


def commands(plan: Plan, devices: list[int], run_kwargs: dict, port: int) -> list[tuple[dict, list[str]]]:
    """(environment additions, argv) of each process to start; rank 0 first."""
    argv = [sys.executable, "-m", WORKER, json.dumps(run_kwargs)]
    if not plan.parallel:
        return [({"CUDA_VISIBLE_DEVICES": ",".join(map(str, devices))}, argv)]
    n = len(devices)
    return [({"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(port), CARD: str(d)}, argv) for r, d in enumerate(devices)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(plan_path, devices: list[int], **run_kwargs) -> int:
    """Start the processes for `plan_path` on `devices` and wait for them; returns 0 or raises."""
    import torch

    plan = Plan.load(plan_path)
    check(plan, devices, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    procs = []
    try:
        for rank, (env, argv) in enumerate(commands(plan, devices, {"plan_path": str(plan_path), **run_kwargs},
                                                    free_port())):
            quiet = subprocess.DEVNULL if rank else None
            procs.append(subprocess.Popen(argv, env={**os.environ, **env}, stdout=quiet))
        return _wait(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()


def _wait(procs) -> int:
    import time

    while True:
        codes = [p.poll() for p in procs]
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            r, c = failed[0]
            raise TierquantError(f"process {r} of {len(procs)} failed (exit code {c}); its error is above")
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)


def _worker(run_kwargs: dict) -> None:
    """One process: join the process group if this is a rank, then run."""
    from .runner import run

    rank = os.environ.get("RANK")
    if rank is None:
        run(**run_kwargs)
        return
    import torch
    import torch.distributed as dist

    card = torch.device("cuda", int(os.environ[CARD]))
    torch.cuda.set_device(card)
    dist.init_process_group("nccl", device_id=card)
    try:
        if int(rank):
            with tempfile.TemporaryDirectory() as scratch:
                run(**{**run_kwargs, "out": scratch, "metrics": None})
        else:
            run(**run_kwargs)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        _worker(json.loads(sys.argv[1]))
    except TierquantError as e:  # one line, as the command line prints it
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
