"""tierquant.profile on tiny random-init pipelines of the real diffusers classes (CPU)."""
import numpy as np
import pytest
import torch

import tierquant
from tierquant import components
from tierquant.counting import LiveBytes, flop_counter
from tierquant.profiler import Recorder
from tierquant.profile import Profile


def _hooks(pipe) -> list[str]:
    """Instance-level patches and module hooks (transformers installs some of its own)."""
    found = []
    for name, module in components.discover(pipe).items():
        found += [f"{name}.{k}" for k in vars(module) if k in components.entry_points(module)]
        found += [f"{name}.{n}:{len(m._forward_pre_hooks)},{len(m._forward_hooks)}"
                  for n, m in module.named_modules() if m._forward_pre_hooks or m._forward_hooks]
    if "step" in vars(pipe.scheduler):
        found.append("scheduler.step")
    return found


def test_flux_profile_counts_calls_phases_and_flops(tiny_flux_pipe, tiny_flux_kwargs):
    reference = tiny_flux_pipe(**tiny_flux_kwargs).images
    hooks = _hooks(tiny_flux_pipe)
    from tierquant.pipelines.tiny import tiny_flux_call

    prof = tierquant.profile(tiny_flux_pipe, **tiny_flux_call(seed=0))
    c = prof.components
    assert prof.pipeline == "FluxPipeline" and prof.steps == 2 and prof.device.startswith("cpu:")
    assert c["text_encoder"].calls == 1 and c["text_encoder_2"].calls == 1
    assert c["transformer"].calls == 2 and c["transformer"].methods == {"forward": 2}
    assert c["vae"].calls >= 1 and c["vae"].methods.get("decode") == 1
    assert [p.components for p in prof.phases] == [["text_encoder"], ["text_encoder_2"], ["transformer"], ["vae"]]
    assert [c[n].phase for n in ("text_encoder", "text_encoder_2", "transformer", "vae")] == [0, 1, 2, 3]
    assert c["transformer"].scales_with_steps and not c["vae"].scales_with_steps
    assert not c["text_encoder"].scales_with_steps
    for cp in c.values():
        assert cp.flops_per_call > 0 and 0 < cp.linear_flops_per_call <= cp.flops_per_call
        assert cp.activation_peak_bytes > 0 and cp.seconds_per_call > 0
        assert cp.params == sum(p.numel() for p in components.discover(tiny_flux_pipe)[cp.name].parameters())
        assert cp.weight_bytes >= 4 * cp.params and cp.largest_block_bytes > 0
    assert c["transformer"].repeated_blocks == ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    # Rows through a Linear: CLIP sees its 77 tokens, T5 its max_sequence_length.
    rows = {l.name: l.rows_per_call for l in c["text_encoder"].layers}
    assert rows["encoder.layers.0.self_attn.q_proj"] == 77
    rows = {l.name: l.rows_per_call for l in c["text_encoder_2"].layers}
    assert rows["encoder.block.0.layer.0.SelfAttention.q"] == 32
    # T5 keeps its `wo` in fp32 (_keep_in_fp32_modules): the reason comes along.
    assert any(l.keep and "fp32" in l.keep for l in c["text_encoder_2"].layers)
    # Profiling leaves the pipeline as it was.
    assert _hooks(tiny_flux_pipe) == hooks
    assert np.array_equal(tiny_flux_pipe(**tiny_flux_call(seed=0)).images, reference)


def test_linear_flops_match_rows(tiny_flux_pipe, tiny_flux_kwargs):
    prof = tierquant.profile(tiny_flux_pipe, **tiny_flux_kwargs)
    for cp in prof.components.values():
        from_rows = sum(2 * l.rows_per_call * l.in_features * l.out_features for l in cp.layers)
        assert from_rows == pytest.approx(cp.linear_flops_per_call)


def test_profile_round_trips_and_scales(tiny_flux_pipe, tiny_flux_kwargs, tmp_path):
    prof = tierquant.profile(tiny_flux_pipe, **tiny_flux_kwargs)
    prof.save(tmp_path / "p.json")
    back = Profile.load(tmp_path / "p.json")
    assert back == prof
    assert "generator" not in back.call_kwargs and back.call_kwargs["num_inference_steps"] == 2
    s = back.scaled(28)
    assert s.steps == 28 and s.call_kwargs["num_inference_steps"] == 28
    assert s.components["transformer"].calls == 28 and s.components["transformer"].methods == {"forward": 28}
    assert s.components["text_encoder_2"].calls == 1 and s.components["vae"].calls == 1


def test_sd3_profile_with_cfg(tiny_sd3_pipe, tiny_sd3_kwargs):
    reference = tiny_sd3_pipe(**tiny_sd3_kwargs).images
    hooks = _hooks(tiny_sd3_pipe)
    from tierquant.pipelines.tiny import tiny_sd3_call

    prof = tierquant.profile(tiny_sd3_pipe, **tiny_sd3_call(seed=0))
    c = prof.components
    assert prof.pipeline == "StableDiffusion3Pipeline"
    # Prompt and negative prompt: each encoder twice, all in one phase (their calls interleave).
    assert [p.components for p in prof.phases] == [["text_encoder", "text_encoder_2", "text_encoder_3"],
                                                    ["transformer"], ["vae"]]
    assert all(c[n].calls == 2 and not c[n].scales_with_steps for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    # CFG runs the transformer once per step on a batch of 2 (cond + uncond).
    assert c["transformer"].calls == 2 and c["transformer"].scales_with_steps
    rows = {l.name: l.rows_per_call for l in c["transformer"].layers}
    assert rows["context_embedder"] == 2 * 32 + 2 * 77  # batch 2 x (T5 tokens + CLIP tokens)
    assert all(cp.flops_per_call > 0 for cp in c.values())
    assert _hooks(tiny_sd3_pipe) == hooks
    assert np.array_equal(tiny_sd3_pipe(**tiny_sd3_call(seed=0)).images, reference)


def test_hooks_removed_when_the_pipeline_fails(tiny_flux_pipe, tiny_flux_kwargs):
    tiny_flux_pipe(**tiny_flux_kwargs)
    hooks = _hooks(tiny_flux_pipe)

    def broken(*args, **kwargs):
        raise RuntimeError("decoder failed")
    tiny_flux_pipe.vae.decoder.forward = broken  # fails in the last phase, inside a hooked call
    with pytest.raises(RuntimeError, match="decoder failed"):
        tierquant.profile(tiny_flux_pipe, **tiny_flux_kwargs)
    del tiny_flux_pipe.vae.decoder.forward
    assert _hooks(tiny_flux_pipe) == hooks


def test_reentrant_calls_count_once(tiny_flux_pipe):
    vae = tiny_flux_pipe.vae
    x = torch.randn(1, 3, 64, 64)
    with Recorder(tiny_flux_pipe, progress=False) as rec, torch.no_grad():
        vae(x)  # forward runs encode and decode inside
    prof = rec.profile(None, {})
    assert prof.components["vae"].methods == {"forward": 1}
    assert prof.components["transformer"].calls == 0 and prof.components["transformer"].phase == -1


def test_live_bytes_tracks_frees_and_views():
    x = torch.randn(256, 256)
    with LiveBytes() as mem:
        y = x * 2
        z = y.view(-1)  # a view: no new storage
        y.mul_(3)
        w = y + 1
        del y, z
        assert mem.live == w.nbytes
    assert mem.peak == 2 * x.nbytes


def test_flop_counter_counts_cpu_attention():
    q = torch.randn(1, 2, 64, 16)
    with flop_counter() as f:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert f.get_total_flops() == 2 * 2 * (2 * 64 * 64 * 16)


class _Toy:
    """Not a diffusers pipeline: models as attributes, no scheduler, a call with steps."""

    def __init__(self):
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(64, 64)
        self.denoiser = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))

    def __call__(self, x, num_inference_steps=3):
        h = self.encoder(x)
        for _ in range(num_inference_steps):
            h = h - 0.1 * self.denoiser(h)
        return h


def test_any_callable_with_module_attributes():
    toy = _Toy()
    x = torch.randn(5, 64)
    prof = tierquant.profile(toy, x=x, num_inference_steps=4)
    assert prof.pipeline == "_Toy" and prof.steps == 4 and "x" not in prof.call_kwargs
    enc, den = prof.components["encoder"], prof.components["denoiser"]
    assert (enc.calls, den.calls) == (1, 4)
    assert den.scales_with_steps and not enc.scales_with_steps  # from the call counts (no scheduler)
    assert den.flops_per_call == pytest.approx(2 * 5 * (64 * 128 + 128 * 64), rel=0.05)
    assert [l.rows_per_call for l in den.layers] == [5, 5]
    assert [p.components for p in prof.phases] == [["encoder"], ["denoiser"]]
    default_steps = tierquant.profile(toy, x=x)
    assert default_steps.steps == 3 and default_steps.components["denoiser"].calls == 3
