"""GPU-only: the memory promise at full size. Skips cleanly without CUDA.

The full-size Flux test builds the 12B transformer and T5-XXL (random init) and needs a card with
more than 24 GiB and some minutes, so it also asks for TIERQUANT_FULL_GPU=1. Its recorded run, with
seconds per step and peak next to the plan's predictions, is the tiered 24 GiB row of
benchmarks/results/<card>/frontier.json.
"""
import os

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GiB = 1024**3


@cuda
def test_tiny_plan_runs_under_its_hard_cap():
    import tierquant
    from tierquant.pipelines.tiny import tiny_flux, tiny_flux_call

    pipe = tiny_flux(dtype=torch.bfloat16)
    call = tiny_flux_call()
    prof = tierquant.profile(pipe, **call)
    budget = 2 * GiB  # the planner keeps 1 GiB for CUDA workspaces on a GPU
    plan = tierquant.plan(prof, budget=budget)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.set_per_process_memory_fraction(budget / total)
    try:
        pipe = tierquant.apply(pipe, plan)
        pipe(**call)
        assert torch.cuda.max_memory_reserved() <= budget
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


@cuda
@pytest.mark.skipif(os.environ.get("TIERQUANT_FULL_GPU") != "1", reason="set TIERQUANT_FULL_GPU=1 (minutes, >24 GiB card)")
def test_flux_dev_24gib_plan_generates_under_a_24gib_cap():
    import tierquant
    from tierquant.pipelines.builtin import build, default_call

    total = torch.cuda.get_device_properties(0).total_memory
    if total < 30 * GiB:
        pytest.skip("needs a card with more than 24 GiB to prove a 24 GiB cap")
    torch.cuda.set_per_process_memory_fraction(24 * GiB / total)
    try:
        plan = tierquant.plan("flux-dev", budget="24GiB")
        assert plan.predicted_peak_bytes <= 24 * GiB
        pipe = build("flux-dev", device="cpu", dtype=torch.bfloat16)
        pipe = tierquant.apply(pipe, plan)
        call = {**default_call("flux-dev"), "num_inference_steps": 4, "output_type": "pil"}
        pipe(**call, generator=torch.Generator("cpu").manual_seed(0))
        assert torch.cuda.max_memory_reserved() <= 24 * GiB
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
