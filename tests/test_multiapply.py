"""Applying plans over several cards (multiapply.py): what can be decided on a CPU is tested here; the
runs themselves need two CUDA GPUs and skip without them."""
from dataclasses import replace

import pytest
import torch
from torch import nn

import tierquant
from tierquant import components as C
from tierquant import multiapply as M
from tierquant.checks import fingerprint
from tierquant.errors import PlanError, PlanNotRunnableError
from tierquant.hardware import GiB, target
from tierquant.plan import Choice, Plan

from test_apply import assert_unchanged, snapshot

TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2


def two_card_plan(pipe, where: dict, parallel=None) -> Plan:
    """Every component bf16 and resident, on the card `where` says (default 0), over two H100s."""
    comps = {n: Choice("bf16", "resident", False, device=where.get(n, 0), predicted_seconds=1.0 if n == "transformer"
                       else 0.1) for n in C.discover(pipe)}
    hw = target("h100").to_dict()
    devices = [{"hardware": hw, "budget_bytes": 8 * GiB, "peak_bytes": GiB, "components": [n for n, c in comps.items()
                                                                                          if c.device == d]}
               for d in range(2)]
    return Plan(components=comps, predicted_latency_s=1.0, predicted_peak_bytes=GiB, budget_bytes=8 * GiB,
                hardware=hw, pipeline=fingerprint(pipe), devices=devices, parallel=parallel)


def test_device_map_and_home_card(tiny_flux_pipe):
    plan = two_card_plan(tiny_flux_pipe, {"text_encoder_2": 1, "text_encoder": 1})
    m = M.device_map(plan)
    assert m["text_encoder_2"] == m["text_encoder"] == "cuda:1" and m["transformer"] == m["vae"] == "cuda:0"
    assert M.home_card(plan) == 0
    part = M.card_plan(plan, 1)
    assert set(part.components) == {"text_encoder", "text_encoder_2"} and part.devices == []
    par = {"component": "transformer", "kind": "ulysses", "degree": 2, "devices": [0, 1]}
    assert set(M.device_map(two_card_plan(tiny_flux_pipe, {}, par)).values()) == {"cuda"}


@pytest.mark.skipif(TWO_GPUS, reason="this machine has the two CUDA GPUs the plan asks for")
def test_a_two_card_plan_is_refused_where_the_cards_are_missing(tiny_flux_pipe):
    plan = two_card_plan(tiny_flux_pipe, {"text_encoder_2": 1})
    before = snapshot(tiny_flux_pipe)
    with pytest.raises(PlanNotRunnableError, match="CUDA GPU") as e:
        tierquant.apply(tiny_flux_pipe, plan, progress=False)
    assert "text_encoder_2" in str(e.value) or "no CUDA GPU" in str(e.value)
    assert_unchanged(before, tiny_flux_pipe)


def test_a_context_parallel_plan_needs_one_process_per_card(tiny_flux_pipe):
    par = {"component": "transformer", "kind": "ulysses", "degree": 2, "devices": [0, 1]}
    plan = two_card_plan(tiny_flux_pipe, {}, par)
    before = snapshot(tiny_flux_pipe)
    with pytest.raises(PlanNotRunnableError, match="--devices 0,1|no CUDA GPU"):
        tierquant.apply(tiny_flux_pipe, plan, progress=False)
    assert_unchanged(before, tiny_flux_pipe)


def test_a_plan_for_another_pipeline_is_refused_first(tiny_flux_pipe, tiny_sd3_pipe):
    plan = two_card_plan(tiny_flux_pipe, {"text_encoder_2": 1})
    before = snapshot(tiny_sd3_pipe)
    with pytest.raises(PlanError, match="another pipeline"):
        tierquant.apply(tiny_sd3_pipe, plan, progress=False)
    assert_unchanged(before, tiny_sd3_pipe)


def test_to_device_reaches_tensors_in_outputs():
    from diffusers.models.autoencoders.vae import DecoderOutput

    meta = torch.device("meta")
    out = M.to_device({"a": [torch.ones(2), (torch.zeros(1), 3)], "b": "text"}, meta)
    assert out["a"][0].device == meta and out["a"][1][0].device == meta and out["a"][1][1] == 3
    dec = M.to_device(DecoderOutput(sample=torch.ones(1, 3, 4, 4)), meta)
    assert dec.sample.device == meta and dec[0].device == meta


def test_the_card_hook_moves_inputs_there_and_outputs_back():
    from tierquant.hooks import add_hook, remove_hook

    lin = nn.Linear(4, 4)
    add_hook(lin, M.HOOK, M.ToCard(torch.device("cpu"), torch.device("meta")), ["forward"])
    y = lin(torch.ones(1, 4))
    assert y.device.type == "meta"
    remove_hook(lin, M.HOOK)
    assert lin(torch.ones(1, 4)).device.type == "cpu"


def test_enable_parallelism_builds_diffusers_config_from_the_plan():
    seen = {}

    class Denoiser(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def enable_parallelism(self, *, config):
            seen["config"] = config

    class Pipe:
        def __init__(self):
            self.transformer = Denoiser()

        def __call__(self):
            return None

    par = {"component": "transformer", "kind": "ring", "degree": 4, "devices": [0, 1, 2, 3]}
    plan = Plan(components={"transformer": Choice("bf16", "resident", False)}, predicted_latency_s=1.0,
                predicted_peak_bytes=1, budget_bytes=GiB, hardware=target("h100").to_dict(), pipeline={},
                devices=[{"hardware": target("h100").to_dict(), "budget_bytes": GiB}] * 4, parallel=par)
    M.enable_parallelism(Pipe(), plan)
    assert (seen["config"].ring_degree, seen["config"].ulysses_degree) == (4, 1)
    plain = Pipe()
    plain.transformer = nn.Linear(2, 2)
    with pytest.raises(PlanNotRunnableError, match="no enable_parallelism"):
        M.enable_parallelism(plain, plan)


@pytest.mark.skipif(not TWO_GPUS, reason="needs 2 CUDA GPUs")
def test_components_on_two_cards_generate(tiny_flux_pipe, tiny_flux_kwargs):
    plan = two_card_plan(tiny_flux_pipe, {"text_encoder_2": 1, "vae": 1})
    pipe = tierquant.apply(tiny_flux_pipe, plan, progress=False)
    comps = C.discover(pipe)
    assert C.device_of(comps["text_encoder_2"]) == torch.device("cuda", 1)
    assert C.device_of(comps["transformer"]) == torch.device("cuda", 0)
    out = pipe(**tiny_flux_kwargs, output_type="pt").images
    assert torch.isfinite(out).all()
    assert pipe._tierquant["devices"]["vae"] == "cuda:1"
    M.remove(pipe)
    assert replace(plan).devices  # the plan is left as it was


# -- tierquant run --devices (launch.py) ----------------------------------------------------------
def _plans(tmp_path):
    from tierquant.devices import plan_devices
    from tierquant.hardware import parse_budget
    from tierquant.pipelines.builtin import profile_builtin

    prof = profile_builtin("flux-dev", num_inference_steps=28, progress=False)
    hw, b = target("h100"), parse_budget("80GiB")
    cp = plan_devices(prof, [hw] * 4, [b] * 4)
    cards = plan_devices(prof, [target("rtx4070")] * 2, [parse_budget("12GiB")] * 2, parallel=False)
    return cp.save(tmp_path / "cp.json"), cards.save(tmp_path / "cards.json")


def test_launch_checks_the_device_list_against_the_plan(tmp_path):
    from tierquant import launch as L

    cp_path, cards_path = _plans(tmp_path)
    cp, cards = Plan.load(cp_path), Plan.load(cards_path)
    L.check(cp, [0, 1, 2, 3], 4)
    with pytest.raises(tierquant.TierquantError, match="over 4 cards; --devices names 2: give 4"):
        L.check(cp, [0, 1], 4)
    with pytest.raises(tierquant.TierquantError, match="torch sees 2 CUDA GPU"):
        L.check(cp, [0, 1, 2, 3], 2)
    with pytest.raises(tierquant.TierquantError, match="no CUDA GPU"):
        L.check(cards, [0, 1], 0)
    L.check(cards, [2, 3], 4)
    ranks = L.commands(cp, [4, 5, 6, 7], {"prompt": "a cat"}, 29500)
    assert [e["RANK"] for e, _ in ranks] == ["0", "1", "2", "3"]
    assert [e[L.CARD] for e, _ in ranks] == ["4", "5", "6", "7"]
    assert {e["WORLD_SIZE"] for e, _ in ranks} == {"4"} and {e["MASTER_PORT"] for e, _ in ranks} == {"29500"}
    assert "CUDA_VISIBLE_DEVICES" not in ranks[0][0]  # NCCL should see every card (NVLink between them)
    (env, argv), = L.commands(cards, [2, 3], {"prompt": "a cat"}, 29500)
    assert env == {"CUDA_VISIBLE_DEVICES": "2,3"} and argv[1:3] == ["-m", "tierquant.launch"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_run_devices_without_gpus_says_so(tmp_path, capsys):
    from tierquant.cli import main

    cp_path, _ = _plans(tmp_path)
    assert main(["run", str(cp_path), "--prompt", "a cat", "--pipeline", "embedded", "--devices", "0,1,2,3"]) == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err
    assert main(["run", str(cp_path), "--prompt", "a cat", "--pipeline", "embedded", "--devices", "0,x"]) == 2
    assert "--devices takes CUDA device indices" in capsys.readouterr().err
    assert main(["run", str(cp_path), "--prompt", "a cat", "--pipeline", "embedded", "--devices", "0,0"]) == 2
    assert "each card once" in capsys.readouterr().err
    assert main(["run", str(cp_path), "--prompt", "a cat", "--pipeline", "embedded"]) == 2
    assert "CUDA GPU" in capsys.readouterr().err


CP_RANK = """
import os, sys, torch, torch.distributed as dist
import tierquant
from tierquant.pipelines.tiny import tiny_flux, tiny_flux_call
from tierquant.plan import Plan
rank = int(os.environ["RANK"])
card = torch.device("cuda", rank)
torch.cuda.set_device(card)
dist.init_process_group("nccl", device_id=card)
pipe = tierquant.apply(tiny_flux(seed=0), Plan.load(sys.argv[1]), progress=False)
out = pipe(**tiny_flux_call(seed=0), output_type="pt").images
if rank == 0:
    torch.save(out.float().cpu(), sys.argv[2])
dist.destroy_process_group()
"""


@pytest.mark.skipif(not TWO_GPUS, reason="needs 2 CUDA GPUs")
def test_context_parallel_over_two_cards_matches_one_card(tmp_path, tiny_flux_pipe, tiny_flux_kwargs):
    import os
    import subprocess
    import sys

    from tierquant.launch import free_port

    par = {"component": "transformer", "kind": "ring", "degree": 2, "devices": [0, 1]}
    plan = two_card_plan(tiny_flux_pipe, {}, par)
    path = plan.save(tmp_path / "cp.json")
    ref = tierquant.apply(tiny_flux_pipe, plan.rank_plan(), device="cuda:0", progress=False)
    want = ref(**tiny_flux_kwargs, output_type="pt").images.float().cpu()
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", CP_RANK, str(path), str(tmp_path / "out.pt")],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(2)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    got = torch.load(tmp_path / "out.pt")
    assert got.shape == want.shape and (got - want).abs().max() < 0.05
