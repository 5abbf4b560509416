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


@cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="fp8-dynamic needs FP8 tensor cores")
@pytest.mark.parametrize("stage", [False, True], ids=["per-tensor", "staged"])
def test_streamed_fp8_blocks_in_compiled_regions_match_the_resident_run(stage, monkeypatch):
    """Half of the transformer's blocks streamed, FP8, compiled: the same image as all resident
    and compiled (PSNR >= 40 dB at the same seed), and one compilation per block class, whether the
    streamed blocks move tensor by tensor or staged (their weights views of one window slot)."""
    import numpy as np

    import tierquant
    from tierquant import streaming
    from tierquant import components as C
    from tierquant.checks import fingerprint
    from tierquant.hardware import detect
    from tierquant.pipelines.tiny import tiny_flux, tiny_flux_call
    from tierquant.plan import Choice, Plan

    images, graphs = {}, []
    real = torch.compile

    def counting_compile(fn, **kw):
        inner = kw.pop("backend", "inductor")

        def backend(gm, example_inputs):
            graphs.append(gm)
            return torch._inductor.compile(gm, example_inputs) if inner == "inductor" else gm.forward
        return real(fn, backend=backend, **kw)

    monkeypatch.setattr(streaming, "STAGE", stage)
    for placement in ("resident", "streamed"):
        torch._dynamo.reset()
        graphs.clear()
        pipe = tiny_flux(seed=0, dtype=torch.bfloat16)
        n = len(C.stream_blocks(pipe.transformer))
        comps = {name: Choice("bf16", "resident", False) for name in C.discover(pipe)}
        comps["transformer"] = Choice("fp8-dynamic", placement, True,
                                      resident_blocks=n // 2 if placement == "streamed" else None, prefetch=1)
        plan = Plan(components=comps, predicted_latency_s=1.0, predicted_peak_bytes=1, budget_bytes=8 * GiB,
                    hardware=detect().to_dict(), pipeline=fingerprint(pipe), phases=[])
        torch.compile = counting_compile
        try:
            pipe = tierquant.apply(pipe, plan, device="cuda", progress=False)
            images[placement] = np.asarray(pipe(**tiny_flux_call(seed=0)).images, dtype=np.float64)
        finally:
            torch.compile = real
        if placement == "streamed":
            classes = {type(b).__name__ for _, b in C.stream_blocks(pipe.transformer)}
            assert len(graphs) <= 2 * len(classes)
            streamer = pipe._tierquant_streamers["transformer"]
            assert streamer.on == 0
            assert (streamer.window is not None) == stage  # the engine asked for is the one that ran
    mse = float(np.mean((images["resident"] - images["streamed"]) ** 2))
    assert mse == 0 or 10 * np.log10(1 / mse) >= 40


@cuda
def test_host_memory_is_locked_at_its_exact_size_and_copies_from_it_overlap():
    """pinned.empty: registered with CUDA as it is (torch's pinned allocator would round 326 MiB up to
    512), seen as pinned by torch, and a non-blocking copy from it returns before the copy is done."""
    import gc

    from tierquant import pinned

    gc.collect()
    before = pinned.registered_bytes()
    host_stats = getattr(torch.cuda, "host_memory_stats", lambda: {})
    allocator_before = host_stats().get("allocated_bytes.current", 0)
    nbytes = 326 * 2**20 + 4096 + 7
    buf, locked = pinned.empty(nbytes)
    assert locked and buf.is_pinned() and buf.numel() == nbytes
    assert pinned.registered_bytes() == before + nbytes
    assert host_stats().get("allocated_bytes.current", 0) == allocator_before  # not torch's allocator
    buf.view(-1)[: nbytes // 4 * 4].view(torch.int32).copy_(torch.arange(nbytes // 4, dtype=torch.int32))
    side = torch.cuda.Stream()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # the stream is busy: an asynchronous copy queues behind it
        done = torch.cuda.Event()
        dev.copy_(buf, non_blocking=True)
        done.record()
    assert not done.query()  # the host did not wait for the copy
    side.synchronize()
    ints = dev[: nbytes // 4 * 4].view(torch.int32)
    assert torch.equal(ints[-5:].cpu(), torch.arange(nbytes // 4 - 5, nbytes // 4, dtype=torch.int32))
    del buf, dev, ints
    gc.collect()
    assert pinned.registered_bytes() == before


@cuda
def test_tiled_decoding_on_the_gpu_blends_in_one_step_with_the_same_pixels():
    """activations.FastBlend on CUDA, bf16: the same pixels as diffusers' row-by-row blend (the CPU
    tests check the arithmetic there; CUDA takes the loop's Python-float weights its own way)."""
    from tierquant import activations
    from tierquant.hooks import remove_hook
    from tierquant.pipelines.tiny import tiny_flux

    vae = tiny_flux(dtype=torch.bfloat16).vae.to("cuda")
    activations.enable_tiling(vae)
    t = vae.tile_latent_min_size
    z = torch.randn(1, vae.config.latent_channels, 2 * t + 3, 2 * t - 1, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fast = vae.decode(z).sample
        remove_hook(vae, activations.BLEND_HOOK)
        slow = vae.decode(z).sample
    assert torch.equal(fast, slow)
