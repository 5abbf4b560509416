"""Activation memory as a knob (tiled decoding, emptying the cache between phases) and where the
streamed blocks of a partly resident component sit."""
from dataclasses import replace

import pytest
import torch

from tierquant import activations
from tierquant import components as C
from tierquant.cost import freeing_seconds, phase_peaks, price
from tierquant.hardware import GiB, parse_budget, target
from tierquant.pipelines.builtin import profile_builtin
from tierquant.plan import Plan, PlanError, streamed_blocks
from tierquant.planner import make_plan
from tierquant.streaming import BlockStreamer


@pytest.mark.parametrize("n,k", [(57, 43), (57, 0), (57, 56), (24, 12), (5, 3), (1, 0), (12, 11)])
def test_streamed_blocks_are_spread_evenly(n, k):
    idx = streamed_blocks(n, k)
    assert len(idx) == n - k and idx == sorted(set(idx)) and all(0 <= j < n for j in idx)
    if 0 < len(idx) <= n // 2:
        # never two streamed blocks in a row, and resident blocks before the first one
        assert all(b - a >= 2 for a, b in zip(idx, idx[1:])) and idx[0] >= 1
    assert streamed_blocks(n, n) == [] and streamed_blocks(n, n + 3) == [] and streamed_blocks(n, None) == list(range(n))


def test_the_streamer_streams_the_blocks_the_cost_model_priced(tiny_flux_pipe):
    tr = tiny_flux_pipe.transformer
    blocks = [b for _, b in C.stream_blocks(tr)]
    s = BlockStreamer(tr, torch.device("cpu"), resident_blocks=2, prefetch=1)
    moving = streamed_blocks(len(blocks), 2)
    assert [sw.module for sw in s.streamed] == [blocks[j] for j in moving]
    assert s.resident == [b for j, b in enumerate(blocks) if j not in moving]
    s.remove()


def test_the_flux_vae_can_decode_in_tiles_at_1024():
    prof = profile_builtin("flux-dev", num_inference_steps=28, progress=False)
    vae = prof.components["vae"]
    assert vae.tiled_activation_peak_bytes == int(vae.activation_peak_bytes * 0.25)
    assert vae.tiled_work == pytest.approx((64 + 64 + 32) ** 2 / 128 ** 2)  # latent tiles of 64 every 48
    assert prof.components["transformer"].tiled_activation_peak_bytes is None  # no enable_tiling


def test_tiling_facts_and_enable_tiling_on_a_real_autoencoder(tiny_flux_pipe):
    vae = tiny_flux_pipe.vae
    assert activations.tiling_facts(vae, 512, 512) is None  # one tile anyway
    assert activations.tiling_facts(tiny_flux_pipe.transformer, 1024, 1024) is None
    share, work = activations.tiling_facts(vae, 1024, 2048)
    assert share == pytest.approx(512 * 512 / (1024 * 2048)) and work > 1
    scale = vae.tile_sample_min_size / vae.tile_latent_min_size
    activations.enable_tiling(vae)
    assert vae.use_tiling and vae.tile_sample_min_size == activations.TILE_PX
    assert vae.tile_latent_min_size == int(activations.TILE_PX / scale)
    seen = []
    real = vae.tiled_decode
    vae.tiled_decode = lambda z, **kw: seen.append(tuple(z.shape)) or real(z, **kw)
    z = torch.zeros(1, vae.config.latent_channels, 2 * vae.tile_latent_min_size, vae.tile_latent_min_size + 1)
    with torch.no_grad():
        out = vae.decode(z).sample
    assert seen and out.shape[-2:] == (z.shape[-2] * scale, z.shape[-1] * scale)


def test_tight_budgets_decode_in_tiles_and_generous_ones_do_not():
    prof = profile_builtin("flux-dev", num_inference_steps=28, progress=False)
    hw = target("h100")
    tight = make_plan(prof, hw, parse_budget("8GiB"))
    loose = make_plan(prof, hw, parse_budget("40GiB"))
    assert tight.components["vae"].tiled and "decodes in tiles" in tight.components["vae"].reason
    assert not loose.components["vae"].tiled
    # the tiled plan's peak counts the tiles' activations: untiled, the same choices would not fit
    assert tight.predicted_peak_bytes <= 8 * GiB
    choices = {n: (c.scheme, c.placement, c.compile) for n, c in loose.components.items()}
    assert price(prof, hw, choices)[0] <= loose.predicted_latency_s + 1e-9


def test_emptying_the_cache_between_phases_frees_what_earlier_phases_left():
    prof = profile_builtin("flux-dev", num_inference_steps=28, progress=False)
    hw = target("h100")
    plan = make_plan(prof, hw, parse_budget("12GiB"))
    # the same options with and without freeing: the later phases carry less when freed
    from tierquant.cost import options_for
    from tierquant.schemes import CATALOG

    chosen = {}
    for n, c in plan.components.items():
        opts = options_for(prof.components[n], hw, {c.scheme: CATALOG[c.scheme]}, {}, None)
        chosen[n] = next(o for o in opts if (o.placement, o.compile, o.resident_blocks, o.prefetch, o.tiled)
                         == (c.placement, c.compile, c.resident_blocks, c.prefetch, c.tiled))
    kept, freed = phase_peaks(prof, chosen), phase_peaks(prof, chosen, free=True)
    assert freed[0] == kept[0] and all(f <= k for f, k in zip(freed, kept)) and freed[-2] < kept[-2]
    assert freeing_seconds(prof) == pytest.approx(0.005 * len(prof.phases))
    # the planner takes it where it buys speed, and says so; a generous budget does without it
    small = [make_plan(prof, hw, parse_budget(f"{b}GiB")) for b in (5, 6, 7, 8, 10, 12)]
    assert any(p.free_between_phases for p in small)
    for p in small:
        assert p.free_between_phases == any("cache is emptied" in note for note in p.notes)
    assert not make_plan(prof, hw, parse_budget("40GiB")).free_between_phases
    assert not make_plan(prof, target("cpu"), parse_budget("24GiB")).free_between_phases  # no GPU allocator


def test_plan_files_keep_tiling_and_freeing(tmp_path):
    prof = profile_builtin("flux-dev", num_inference_steps=28, progress=False)
    plan = make_plan(prof, target("h100"), parse_budget("8GiB"))
    plan.free_between_phases = True
    back = Plan.load(plan.save(tmp_path / "p.json"))
    assert back.free_between_phases and back.components["vae"].tiled == plan.components["vae"].tiled
    d = plan.to_dict()
    d["components"]["vae"]["tiled"] = "yes"
    with pytest.raises(PlanError, match="'tiled' must be true or false"):
        Plan.from_dict(d)
    d = plan.to_dict()
    d["free_between_phases"] = 1
    with pytest.raises(PlanError, match="free_between_phases"):
        Plan.from_dict(d)
    d = plan.to_dict()
    del d["free_between_phases"]
    for c in d["components"].values():
        c.pop("tiled")
    old = Plan.from_dict(d)  # files from before the knob
    assert not old.free_between_phases and not any(c.tiled for c in old.components.values())


def test_applying_a_tiled_choice_tiles_the_vae(tiny_flux_pipe):
    import tierquant
    from tierquant.checks import fingerprint
    from tierquant.hardware import detect
    from tierquant.plan import Choice

    comps = {n: Choice("bf16", "resident", False) for n in C.discover(tiny_flux_pipe)}
    comps["vae"] = replace(comps["vae"], tiled=True)
    plan = Plan(components=comps, predicted_latency_s=1.0, predicted_peak_bytes=1, budget_bytes=8 * GiB,
                hardware=detect().to_dict(), pipeline=fingerprint(tiny_flux_pipe), free_between_phases=True)
    pipe = tierquant.apply(tiny_flux_pipe, plan, device="cpu", progress=False)
    assert pipe.vae.use_tiling and pipe.vae.tile_sample_min_size == activations.TILE_PX
    assert pipe._tierquant["components"]["vae"]["tiled"]
    assert pipe._tierquant_switcher is None  # nothing to free on a CPU


def test_a_streaming_window_is_held_through_later_phases_unless_the_cache_is_emptied():
    """Every streamed component copies on one side stream (streaming.copy_stream), whose pool keeps
    the blocks of the largest window so far: a later phase pays for what its own window cannot reuse."""
    from tierquant.cost import Option

    prof = profile_builtin("flux-dev", num_inference_steps=28, progress=False)
    phase = {n: c.phase for n, c in prof.components.items()}
    t5, tr = "text_encoder_2", "transformer"
    assert phase[t5] < phase[tr] < phase["vae"]

    def opt(name, placement, window):
        return Option(name, "bf16", placement, False, 0.0, 0.0, 0, 0, window, 0.0, activation_bytes=0)

    gb = 1 << 30
    base = {n: opt(n, "resident", 0) for n in prof.components}
    big_t5 = {**base, t5: opt(t5, "streamed", 3 * gb), tr: opt(tr, "streamed", 1 * gb)}
    kept = phase_peaks(prof, big_t5)
    freed = phase_peaks(prof, big_t5, free=True)
    # the transformer's 1 GiB window reuses 1 of the 3 GiB T5 left; the VAE's phase holds all 3
    assert kept[phase[tr]] - freed[phase[tr]] >= 2 * gb
    assert kept[phase["vae"]] - freed[phase["vae"]] >= 3 * gb
    # a later window at least as large as the held one reuses it all
    small_t5 = {**base, t5: opt(t5, "streamed", 1 * gb), tr: opt(tr, "streamed", 3 * gb)}
    assert phase_peaks(prof, small_t5)[phase[tr]] - phase_peaks(prof, small_t5, free=True)[phase[tr]] < gb


def _row_loop(a, b, extent, dim):
    """diffusers' blend_v / blend_h, written out as its loop over rows (the reference)."""
    e = min(a.shape[dim], b.shape[dim], extent)
    for y in range(e):
        b.select(dim, y).copy_(a.select(dim, a.shape[dim] - e + y) * (1 - y / e) + b.select(dim, y) * (y / e))
    return b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dim,shape", [(-2, (1, 3, 9, 11)), (-1, (1, 3, 9, 11)), (-2, (1, 2, 3, 9, 11)),
                                       (-1, (1, 2, 3, 9, 11))])
@pytest.mark.parametrize("extent", [1, 4, 50])
def test_the_one_step_blend_is_the_row_loop_bit_for_bit(dtype, dim, shape, extent):
    g = torch.Generator().manual_seed(extent)
    a, b = (torch.randn(shape, generator=g).to(dtype) * 30 for _ in range(2))
    want = _row_loop(a, b.clone(), extent, dim)
    got = b.clone()
    assert activations.blend(a, got, extent, dim) is got  # in place, as diffusers' does
    assert torch.equal(got, want)


def test_tiled_decoding_blends_in_one_step_with_the_same_pixels(tiny_flux_pipe):
    """enable_tiling puts FastBlend on an AutoencoderKL (its blends agree at rank 4, image tiles): a
    tiled decode gives the same pixels as with diffusers' own loop, in float32 and bfloat16."""
    import copy

    from tierquant.hooks import HookRegistry, remove_hook

    for dtype in (torch.float32, torch.bfloat16):
        vae = copy.deepcopy(tiny_flux_pipe.vae).to(dtype)
        activations.enable_tiling(vae)
        reg = HookRegistry.get(vae)
        assert activations.BLEND_HOOK in reg and reg.hooks[activations.BLEND_HOOK][0].ranks == \
            {"blend_v": {4}, "blend_h": {4}}
        t = vae.tile_latent_min_size
        z = torch.randn(1, vae.config.latent_channels, 2 * t + 3, 2 * t - 1,
                        generator=torch.Generator().manual_seed(0)).to(dtype)
        calls = []
        real = activations.blend
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(activations, "blend", lambda *a: calls.append(a[3]) or real(*a))
            with torch.no_grad():
                fast = vae.decode(z).sample
        assert sorted(set(calls)) == [-2, -1]  # both blends went the one-step way
        remove_hook(vae, activations.BLEND_HOOK)
        with torch.no_grad():
            slow = vae.decode(z).sample
        assert torch.equal(fast, slow)


def test_a_vae_whose_blend_differs_keeps_its_own(tiny_flux_pipe):
    import copy

    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan

    from tierquant.hooks import HookRegistry

    class Odd(type(tiny_flux_pipe.vae)):  # blends along the channels: not what `blend` does
        def blend_v(self, a, b, blend_extent):
            b[:, :blend_extent] = a[:, -blend_extent:] * 0.5 + b[:, :blend_extent] * 0.5
            return b

    vae = copy.deepcopy(tiny_flux_pipe.vae)
    vae.__class__ = Odd
    assert activations.blends_alike(vae, "blend_v") == set() and activations.blends_alike(vae, "blend_h") == {4}
    activations.enable_tiling(vae)
    hook = HookRegistry.get(vae).hooks[activations.BLEND_HOOK]
    assert hook[1] == {"blend_h"} and hook[0].ranks == {"blend_h": {4}}

    class Video(torch.nn.Module):  # Wan's own blends, which index (B, C, T, H, W) tiles
        blend_v, blend_h = AutoencoderKLWan.blend_v, AutoencoderKLWan.blend_h

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))

    assert activations.blends_alike(Video(), "blend_v") == {5} and activations.blends_alike(Video(), "blend_h") == {5}
    fast = activations.FastBlend({"blend_v": {5}})
    a, b = torch.randn(1, 2, 6, 7), torch.randn(1, 2, 6, 7)
    seen = []
    # a 4-d call of a blend found alike only at rank 5 goes to the VAE's own
    fast.around(lambda *args: seen.append(args) or args[1], None, "blend_v", (a, b, 3), {})
    assert len(seen) == 1
