"""The built-in pipelines: full-size profiles with no weights (meta), checked against H200 measurements."""
import pytest
import torch

from tierquant import cache
from tierquant.pipelines import builtin

GiB = 1024**3


@pytest.fixture(scope="session")
def flux_profile(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("TIERQUANT_CACHE", str(cache))
    yield builtin.profile_builtin("flux-dev", progress=False)
    mp.undo()


def test_names_and_default_calls():
    assert {"flux-dev", "sd3.5-large"} <= set(builtin.names())
    call = builtin.default_call("flux-dev")
    assert (call["height"], call["width"], call["num_inference_steps"]) == (1024, 1024, 28)
    assert call["guidance_scale"] == 3.5 and call["max_sequence_length"] == 512
    call["height"] = 1  # a copy: the facts do not change
    assert builtin.default_call("flux-dev")["height"] == 1024
    with pytest.raises(KeyError, match="flux-dev"):
        builtin.spec("flux-pro")


def test_flux_dev_profile_matches_h200_measurements(flux_profile):
    p = flux_profile
    assert p.pipeline == "FluxPipeline" and p.device == "meta" and p.steps == 2
    c = p.components
    tr, t5, vae = c["transformer"], c["text_encoder_2"], c["vae"]
    # H200 (docs/measurements.md): 11.9B params, 74.4 TFLOP per step at 1024^2, 22.17 GiB in bf16.
    assert tr.params == pytest.approx(11.9e9, rel=0.02)
    assert tr.flops_per_call == pytest.approx(74.4e12, rel=0.10)
    assert tr.weight_bytes / GiB == pytest.approx(22.17, rel=0.02)
    assert 0.7 < tr.linear_flops_per_call / tr.flops_per_call < 0.9  # the rest is attention at 4608 tokens
    # T5 as from_pretrained gives it: the shared embedding tied to encoder.embed_tokens, counted once.
    # (The H200's 9.15 GiB came from a build that counted it twice: 131,596,288 parameters more.)
    assert t5.params == 4_762_310_656
    assert t5.weight_bytes == 2 * t5.params
    # VAE decode at 1024^2: 10.5 TFLOP; its activations dwarf its weights. Measured on an H200
    # (torch.cuda peak, cuDNN): 2.38 GiB, of which ~0.9 GiB is cuDNN's layout workspace.
    assert vae.methods == {"decode": 1} and vae.flops_per_call == pytest.approx(10.5e12, rel=0.05)
    assert vae.activation_peak_bytes / GiB == pytest.approx(2.38, rel=0.10)
    # The fused attention path: a few hundred MiB at 4608 tokens, not the 2 GiB score matrix.
    assert 0.2 * GiB < tr.activation_peak_bytes < 1.5 * GiB
    # Rows per call: 4096 image tokens through x_embedder, 512 T5 tokens through every T5 Linear.
    rows = {l.name: l.rows_per_call for l in tr.layers}
    assert rows["x_embedder"] == 4096 and rows["context_embedder"] == 512
    assert all(l.rows_per_call == 512 for l in t5.layers)
    assert tr.repeated_blocks == ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    assert 0.5 * GiB < tr.largest_block_bytes < 0.8 * GiB  # one double block, bf16


def test_flux_dev_profile_scales_to_28_steps(flux_profile):
    s = flux_profile.scaled(28)
    assert s.components["transformer"].calls == 28
    assert {n: c.calls for n, c in s.components.items() if n != "transformer"} == \
        {"text_encoder": 1, "text_encoder_2": 1, "vae": 1}
    assert [ph.components for ph in s.phases] == [["text_encoder"], ["text_encoder_2"], ["transformer"], ["vae"]]


def test_profile_is_cached_per_call(flux_profile, monkeypatch):
    # A second request comes from the cache (profiling would fail with the builder broken).
    monkeypatch.setattr(builtin, "build", lambda *a, **k: pytest.fail("profiled again instead of cached"))
    assert builtin.profile_builtin("flux-dev", progress=False) == flux_profile
    assert list(cache.folder("profiles").glob("flux-dev-*.json"))
    with pytest.raises(BaseException, match="profiled again"):
        builtin.profile_builtin("flux-dev", progress=False, height=512)


def test_build_meta_is_full_size_without_memory():
    pipe = builtin.build("flux-dev")
    assert type(pipe).__name__ == "FluxPipeline"
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in m.parameters())
    assert pipe.tokenizer.model_max_length == 77 and pipe.tokenizer_2.model_max_length == 512


def test_build_on_a_real_device_keeps_buffers():
    # The path the GPU benchmarks take, on the CPU with the smallest built-in component.
    clip = builtin.spec("flux-dev").models["text_encoder"]
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        m = clip.make()
    m = builtin._materialise(m.to(torch.bfloat16), torch.device("cpu"))
    assert torch.equal(m.embeddings.position_ids, torch.arange(77)[None])
    w = m.encoder.layers[0].self_attn.q_proj.weight
    assert w.device.type == "cpu" and 0.015 < w.float().std() < 0.025
    assert torch.all(m.final_layer_norm.weight == 1)


def test_sd3_profile_needs_nothing_sd3_specific(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERQUANT_CACHE", str(tmp_path))
    p = builtin.profile_builtin("sd3.5-large", progress=False)
    c = p.components
    assert c["transformer"].params == pytest.approx(8.1e9, rel=0.02)
    assert [ph.components for ph in p.phases] == [["text_encoder", "text_encoder_2", "text_encoder_3"],
                                                  ["transformer"], ["vae"]]
    assert c["transformer"].calls == 2 and c["transformer"].scales_with_steps
    # CFG: batch 2 of (4096 image tokens) per call; 2 x (77 CLIP + 256 T5) text tokens.
    rows = {l.name: l.rows_per_call for l in c["transformer"].layers}
    assert rows["context_embedder"] == 2 * (77 + 256)
    assert all(c[n].calls == 2 for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))


def test_wan_builds_at_full_size_on_meta():
    pipe = builtin.build("wan2.1-t2v-14b")
    assert type(pipe).__name__ == "WanPipeline"
    assert sum(p.numel() for p in pipe.transformer.parameters()) == pytest.approx(14.3e9, rel=0.02)
    assert builtin.default_call("wan2.1-t2v-14b")["num_frames"] == 81


def test_asking_for_a_step_count_scales_the_two_step_profile(flux_profile):
    p = builtin.profile_builtin("flux-dev", progress=False, num_inference_steps=50)  # from the cache
    assert p.steps == 50 and p.components["transformer"].calls == 50
    assert p.components["transformer"].flops_per_call == flux_profile.components["transformer"].flops_per_call


def test_layer_timings_of_a_profile_made_elsewhere_keep_the_whole_call(flux_profile):
    """A built-in profile was not measured on the running card: its calls are the roofline's whole
    call, moved by how much each scheme's Linear layers take on this card compared with bf16's. Fast
    isolated layers must not make the whole call faster (the norms and elementwise work between the
    matmuls are in the roofline's call, not in the layer timings; built the other way, the 24 GiB
    plans for Flux and SD3.5-large predicted 25% and 35% under what an H100 measured)."""
    from tierquant import calibrate
    from tierquant.cost import roofline_call_seconds
    from tierquant.hardware import target
    from tierquant.schemes import CATALOG

    hw = target("h100")
    c = flux_profile.components["transformer"]
    bf16, fp8 = CATALOG["bf16"], CATALOG["fp8-dynamic"]
    shapes = {n: calibrate._shapes(comp) for n, comp in flux_profile.components.items()}
    layers = {k for s in shapes.values() for k in s}

    def table(bf16_s, fp8_s):
        t = {(*k, "bf16", False): bf16_s for k in layers} | {(*k, "fp8-dynamic", False): fp8_s for k in layers}
        return calibrate._assemble(flux_profile, hw, [bf16, fp8], shapes, t, "cuda:this card")

    whole = roofline_call_seconds(c, bf16, False, hw)
    n_layers = sum(shapes["transformer"].values())
    fast = table(1e-6, 0.5e-6)
    assert fast[("transformer", "bf16", False)] == pytest.approx(whole)
    # FP8's layers take 0.5 us less each than bf16's: the call takes that much less, no more
    assert fast[("transformer", "fp8-dynamic", False)] == pytest.approx(whole - n_layers * 0.5e-6)
    # compiled: the roofline's compiled call, anchored on a bf16 call that equals the roofline's
    assert fast[("transformer", "fp8-dynamic", True)] == pytest.approx(roofline_call_seconds(c, fp8, True, hw))
    # layers slower than the roofline's whole call: the measured layers are the floor
    slow = table(1.0, 1.0)
    assert slow[("transformer", "bf16", False)] == pytest.approx(n_layers * 1.0)
