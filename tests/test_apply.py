"""apply / load: plans turned into pipelines, bad plans refused before anything changes."""
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

import tierquant
from tierquant import components as C
from tierquant.checks import estimate_bytes, fingerprint
from tierquant.errors import BackendMissingError, PlanMismatchError, PlanNotRunnableError
from tierquant.placement import PhaseSwitcher, Swapped
from tierquant.units import units
from tierquant.hardware import GiB, detect
from tierquant.pipelines.tiny import tiny_flux, tiny_flux_call, tiny_sd3
from tierquant.plan import Choice, Plan

CUDA = torch.cuda.is_available()


def plan_for(pipe, choices: dict, budget: int = 8 * GiB, phases=None) -> Plan:
    """A hand-made plan for `pipe`: `choices` maps a component to a scheme or (scheme, placement, compile);
    the others stay bf16, resident, eager."""
    comps = {}
    for name in C.discover(pipe):
        c = choices.get(name, "bf16")
        scheme, placement, compile_ = (c, "resident", False) if isinstance(c, str) else c
        comps[name] = Choice(scheme, placement, compile_)
    return Plan(components=comps, predicted_latency_s=1.0, predicted_peak_bytes=budget // 2, budget_bytes=budget,
                hardware=detect().to_dict(), pipeline=fingerprint(pipe), phases=phases or [])


def snapshot(pipe) -> dict:
    """Every tensor (value, dtype, device, type) and module type of every component."""
    out = {}
    for name, m in C.discover(pipe).items():
        for k, t in list(m.named_parameters()) + list(m.named_buffers()):
            out[f"{name}.{k}"] = (type(t).__name__, t.dtype, t.device, t.detach().clone())
        out[f"{name}:types"] = sorted({type(x).__name__ for x in m.modules()})
    return out


def assert_unchanged(before: dict, pipe) -> None:
    after = snapshot(pipe)
    assert before.keys() == after.keys()
    for k, v in before.items():
        w = after[k]
        if isinstance(v, list):
            assert v == w, k
        else:
            assert v[:3] == w[:3], k
            assert torch.equal(v[3], w[3]), k
    assert getattr(pipe, "_tierquant", None) is None


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def t5_wo(t5):
    return [m for n, m in t5.named_modules() if n.endswith(".wo")]


# -- (a) the must-show -------------------------------------------------------------------------
def test_int8_transformer_and_nf4_t5_apply_and_keep_the_image():
    from bitsandbytes.nn import Linear4bit
    from torchao.utils import TorchAOBaseTensor

    pipe = tiny_flux(seed=0, dtype=torch.bfloat16)
    bf16_bytes = sum(p.numel() * 2 for p in pipe.transformer.parameters())
    reference = pipe(**tiny_flux_call(seed=1)).images
    plan = tierquant.plan(pipe, budget="4GiB", pin={"transformer": "int8-weight", "text_encoder_2": "nf4"},
                          measure=False, **tiny_flux_call(seed=1))
    assert plan.components["transformer"].scheme == "int8-weight"
    assert plan.components["text_encoder_2"].scheme == "nf4"

    out = tierquant.apply(pipe, plan, progress=False)
    assert out is pipe

    layers = C.quantizable_layers(pipe.transformer)
    assert any(why is None for _, _, why in layers)
    for name, lin, why in layers:
        assert isinstance(lin.weight, TorchAOBaseTensor) == (why is None), name
    assert pipe._tierquant["components"]["transformer"]["weight_bytes"] < 0.6 * bf16_bytes

    t5 = pipe.text_encoder_2
    assert sum(isinstance(m, Linear4bit) for m in t5.modules()) == 2 * 4 + 2 * 2  # q k v o, wi_0 wi_1 per block
    assert t5_wo(t5) and all(type(m) is nn.Linear and type(m.weight) is nn.Parameter for m in t5_wo(t5))
    kept = pipe._tierquant["components"]["text_encoder_2"]["kept"]
    assert kept and all("fp32" in why for n, why in kept.items() if n.endswith(".wo"))
    json.dumps(pipe._tierquant)  # plain data, for reports
    # components the plan leaves in bf16 stay unquantized
    for name, choice in plan.components.items():
        if choice.scheme == "bf16":
            assert not any(isinstance(m, Linear4bit) or isinstance(getattr(m, "weight", None), TorchAOBaseTensor)
                           for m in getattr(pipe, name).modules()), name

    image = pipe(**tiny_flux_call(seed=1)).images
    assert image.shape == reference.shape and np.isfinite(image).all()
    assert psnr(image, reference) >= 25.0


def test_units_cover_every_tensor_once(tiny_flux_pipe):
    for name, module in C.discover(tiny_flux_pipe).items():
        seen = []
        for prefix, unit, recurse in units(module):
            seen += [id(t) for t in list(unit.parameters(recurse=recurse)) + list(unit.buffers(recurse=recurse))]
        everything = [id(t) for t in list(module.parameters()) + list(module.buffers())]
        assert sorted(set(seen)) == sorted(set(everything)), name
        blocks = {id(b) for b in C.blocks(module)}
        if name == "transformer":  # every transformer block is a unit of its own
            assert blocks <= {id(u) for _, u, _ in units(module)}


def test_bf16_plan_casts_and_keeps_the_image(tiny_flux_pipe, tiny_flux_kwargs):
    pipe = tiny_flux_pipe  # fp32 as built
    plan = plan_for(pipe, {})
    tierquant.apply(pipe, plan, progress=False)
    for name, m in C.discover(pipe).items():
        assert all(p.dtype == torch.bfloat16 for p in m.parameters()), name
    assert np.isfinite(pipe(**tiny_flux_kwargs).images).all()


# -- (b) a plan for another pipeline ----------------------------------------------------------
def test_flux_plan_on_sd3_pipeline_raises_before_any_change(tiny_sd3_pipe):
    flux_plan = plan_for(tiny_flux(seed=0), {"transformer": "int8-weight", "text_encoder_2": "nf4"})
    before = snapshot(tiny_sd3_pipe)
    with pytest.raises(PlanMismatchError) as e:
        tierquant.apply(tiny_sd3_pipe, flux_plan, progress=False)
    msg = str(e.value)
    assert "FluxPipeline" in msg and "StableDiffusion3Pipeline" in msg
    assert "SD3Transformer2DModel" in msg and "text_encoder_3" in msg
    assert "tierquant.plan(pipe" in msg
    assert_unchanged(before, tiny_sd3_pipe)


def test_same_classes_other_sizes_is_a_mismatch(tiny_flux_pipe):
    plan = plan_for(tiny_flux_pipe, {})
    plan.pipeline["components"]["transformer"]["params"] += 1
    with pytest.raises(PlanMismatchError, match="transformer: .* parameters in the plan"):
        tierquant.apply(tiny_flux_pipe, plan, progress=False)


# -- (c) a scheme this device cannot run -------------------------------------------------------
@pytest.mark.skipif(CUDA and detect().has_fp8, reason="fp8-dynamic runs on this GPU")
def test_fp8_dynamic_where_it_cannot_run_names_scheme_device_and_alternatives(tiny_flux_pipe):
    plan = plan_for(tiny_flux_pipe, {"transformer": "fp8-dynamic", "text_encoder_2": "nf4"})
    before = snapshot(tiny_flux_pipe)
    with pytest.raises(PlanNotRunnableError) as e:
        tierquant.apply(tiny_flux_pipe, plan, device=None if CUDA else "cpu", progress=False)
    msg = str(e.value)
    assert "'fp8-dynamic'" in msg and "transformer" in msg
    assert ("CPU" in msg) if not CUDA else (detect().name in msg)
    assert "int8-dynamic" in msg and "fp8-weight" in msg and "int8-weight" in msg
    assert_unchanged(before, tiny_flux_pipe)


def test_off_device_placements_are_refused_on_cpu(tiny_flux_pipe):
    plan = plan_for(tiny_flux_pipe, {"transformer": ("int8-weight", "streamed", False),
                                     "vae": ("bf16", "swapped", False)})
    before = snapshot(tiny_flux_pipe)
    with pytest.raises(PlanNotRunnableError) as e:
        tierquant.apply(tiny_flux_pipe, plan, device="cpu", progress=False)
    msg = str(e.value)
    assert "transformer: placement 'streamed'" in msg and "vae: placement 'swapped'" in msg and "CUDA GPU" in msg
    assert_unchanged(before, tiny_flux_pipe)


def test_a_pipeline_is_applied_once(tiny_flux_pipe):
    plan = plan_for(tiny_flux_pipe, {"transformer": "int8-weight"})
    tierquant.apply(tiny_flux_pipe, plan, device="cpu", progress=False)
    with pytest.raises(tierquant.PlanError, match="already applied"):
        tierquant.apply(tiny_flux_pipe, plan, device="cpu", progress=False)


# -- (d) load: quantize while loading ----------------------------------------------------------
def test_load_applies_the_plans_schemes(tmp_path):
    from bitsandbytes.nn import Linear4bit
    from torchao.utils import TorchAOBaseTensor

    pipe = tiny_flux(seed=0, dtype=torch.bfloat16)
    plan = plan_for(pipe, {"transformer": "int8-weight", "text_encoder_2": "int8-dynamic", "text_encoder": "nf4"})
    pipe.save_pretrained(tmp_path)
    del pipe

    loaded = tierquant.load(tmp_path, plan, device="cpu", progress=False, local_files_only=True)
    rec = loaded._tierquant["components"]
    # torchao schemes were done by the libraries while loading, nf4 (CPU) after
    assert "TorchAoConfig" in rec["transformer"]["quantized_on_load"]
    assert "TorchAoConfig" in rec["text_encoder_2"]["quantized_on_load"]
    assert "quantized_on_load" not in rec["text_encoder"]
    for name, lin, why in C.quantizable_layers(loaded.transformer):
        assert isinstance(lin.weight, TorchAOBaseTensor) == (why is None), name
    t5 = loaded.text_encoder_2
    assert all(type(m.weight) is nn.Parameter for m in t5_wo(t5))  # kept on load too
    assert isinstance(t5.encoder.block[0].layer[0].SelfAttention.q.weight, TorchAOBaseTensor)
    assert any(isinstance(m, Linear4bit) for m in loaded.text_encoder.modules())
    assert all(p.dtype == torch.bfloat16 for p in loaded.vae.parameters())
    assert np.isfinite(loaded(**tiny_flux_call(seed=1)).images).all()


def test_load_refuses_a_plan_for_another_checkpoint(tmp_path):
    flux_plan = plan_for(tiny_flux(seed=0), {})
    tiny_sd3(seed=0).save_pretrained(tmp_path)
    with pytest.raises(PlanMismatchError, match="StableDiffusion3Pipeline"):
        tierquant.load(tmp_path, flux_plan, device="cpu", progress=False, local_files_only=True)


# -- save_applied -----------------------------------------------------------------------------
def test_save_applied_round_trips_torchao_schemes(tmp_path):
    from diffusers import DiffusionPipeline
    from tierquant.checkpoint import save_applied
    from torchao.utils import TorchAOBaseTensor

    pipe = tiny_flux(seed=0, dtype=torch.bfloat16)
    plan = plan_for(pipe, {"transformer": "int8-weight", "text_encoder": "fp8-weight", "text_encoder_2": "int8-dynamic"})
    tierquant.apply(pipe, plan, device="cpu", progress=False)
    image = pipe(**tiny_flux_call(seed=1)).images
    save_applied(pipe, tmp_path)
    assert getattr(pipe.transformer, "hf_quantizer", None) is None  # the live pipeline is left as it was
    assert "quantization_config" not in pipe.transformer.config

    again = DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True, torch_dtype=torch.bfloat16)
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        for lname, lin, why in C.quantizable_layers(getattr(again, name)):
            assert isinstance(lin.weight, TorchAOBaseTensor) == (why is None), (name, lname)
    assert psnr(again(**tiny_flux_call(seed=1)).images, image) >= 60.0


def test_save_applied_writes_nf4_as_a_bitsandbytes_checkpoint(tmp_path):
    import json

    from tierquant.checkpoint import save_applied

    pipe = tiny_flux(seed=0, dtype=torch.bfloat16)
    tierquant.apply(pipe, plan_for(pipe, {"text_encoder_2": "nf4"}), device="cpu", progress=False)
    save_applied(pipe, tmp_path)
    q = json.loads((tmp_path / "text_encoder_2" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "bitsandbytes" and q["bnb_4bit_quant_type"] == "nf4"
    wo = sorted(n for n, _ in pipe.text_encoder_2.named_modules() if n.endswith(".wo"))
    assert wo and sorted(q["llm_int8_skip_modules"]) == wo
    record = json.loads((tmp_path / "tierquant.json").read_text())["components"]
    assert record["text_encoder_2"]["scheme"] == "nf4" and len(record["text_encoder_2"]["quantized"]) == 12
    if CUDA:  # bitsandbytes loads 4-bit checkpoints on a GPU only
        from bitsandbytes.nn import Linear4bit
        from diffusers import DiffusionPipeline

        again = DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True, torch_dtype=torch.bfloat16)
        assert sum(isinstance(m, Linear4bit) for m in again.text_encoder_2.modules()) == 12


def test_save_applied_needs_an_applied_pipeline(tiny_flux_pipe, tmp_path):
    from tierquant.checkpoint import save_applied

    with pytest.raises(tierquant.PlanError, match="no tierquant plan applied"):
        save_applied(tiny_flux_pipe, tmp_path)


# -- (e) a missing backend ---------------------------------------------------------------------
def test_missing_backend_names_scheme_package_and_pip(tiny_flux_pipe, monkeypatch):
    plan = plan_for(tiny_flux_pipe, {"transformer": "int8-weight", "text_encoder_2": "nf4"})
    before = snapshot(tiny_flux_pipe)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(BackendMissingError) as e:
        tierquant.apply(tiny_flux_pipe, plan, device="cpu", progress=False)
    assert "'nf4'" in str(e.value) and "pip install bitsandbytes" in str(e.value)
    assert_unchanged(before, tiny_flux_pipe)


# -- compile and swapping, on CPU ----------------------------------------------------------------
def test_compile_marks_the_repeated_blocks(tiny_flux_pipe):
    plan = plan_for(tiny_flux_pipe, {"transformer": ("int8-weight", "resident", True),
                                     "text_encoder_2": ("bf16", "resident", True)})
    tierquant.apply(tiny_flux_pipe, plan, device="cpu", progress=False)
    tr = tiny_flux_pipe.transformer
    compiled = [m for m in tr.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert {type(m).__name__ for m in compiled} == set(tr._repeated_blocks)
    t5_blocks = [m for m in tiny_flux_pipe.text_encoder_2.modules() if type(m).__name__ == "T5Block"]
    assert t5_blocks and all(m._compiled_call_impl is not None for m in t5_blocks)
    assert tiny_flux_pipe.vae.decoder._compiled_call_impl is None  # not asked for


def test_swapped_tensors_round_trip_including_quantized_ones(tiny_flux_pipe):
    # The swapping mechanics, with the meta device standing in for a GPU.
    from tierquant.backends import quantize
    from torchao.utils import TorchAOBaseTensor

    tr = tiny_flux_pipe.transformer.to(torch.bfloat16)
    quantize(tr, "int8-weight")
    before = {k: v.detach().clone() for k, v in tr.state_dict().items()}
    sw = Swapped(tr, torch.device("meta"))
    sw.onload()
    assert all(p.device.type == "meta" for p in tr.parameters())
    assert isinstance(tr.transformer_blocks[0].attn.to_q.weight, TorchAOBaseTensor)
    sw.offload()
    assert all(p.device.type == "cpu" for p in tr.parameters())
    after = tr.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert type(before[k]) is type(after[k]) and torch.equal(before[k].dequantize() if hasattr(before[k], "qdata")
                                                                 else before[k],
                                                                 after[k].dequantize() if hasattr(after[k], "qdata")
                                                                 else after[k]), k


def test_phase_switch_moves_swapped_components(tiny_flux_pipe):
    pipe = tiny_flux_pipe
    comps = C.discover(pipe)
    plan = plan_for(pipe, {"transformer": ("bf16", "swapped", False), "vae": ("bf16", "swapped", False)},
                    phases=[{"components": ["text_encoder", "text_encoder_2"]}, {"components": ["transformer"]},
                            {"components": ["vae"]}])
    sw = PhaseSwitcher(pipe, plan, comps, {"transformer", "vae"}, torch.device("meta"))
    on = lambda m: next(m.parameters()).device.type == "meta"  # noqa: E731
    sw.enter("text_encoder")
    assert not on(pipe.transformer) and not on(pipe.vae)
    sw.enter("transformer")
    assert on(pipe.transformer) and not on(pipe.vae)
    sw.enter("vae")
    assert on(pipe.vae) and not on(pipe.transformer)
    # decode (not forward) is an entry point too: it starts the vae's phase
    sw.enter("transformer")
    with pytest.raises(Exception):
        pipe.vae.decode(torch.zeros(1, 16, 8, 8))  # meta weights cannot compute
    assert on(pipe.vae) and not on(pipe.transformer)


# -- (f) on a GPU --------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_swapped_component_moves_on_and_off_the_gpu():
    pipe = tiny_flux(seed=0, dtype=torch.bfloat16)
    plan = plan_for(pipe, {"transformer": ("int8-weight", "swapped", False), "vae": ("bf16", "swapped", False),
                           "text_encoder_2": ("nf4", "swapped", False)},
                    phases=[{"components": ["text_encoder", "text_encoder_2"]}, {"components": ["transformer"]},
                            {"components": ["vae"]}])
    tierquant.apply(pipe, plan, device="cuda", progress=False)
    dev = lambda m: next(m.parameters()).device.type  # noqa: E731
    assert dev(pipe.transformer) == "cpu" and dev(pipe.vae) == "cpu" and dev(pipe.text_encoder) == "cuda"
    assert next(pipe.vae.parameters()).is_pinned()
    seen = {}
    # on a block: a torch pre-hook on the component itself runs before the phase switch moves it on
    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a: seen.setdefault("transformer", dev(m)) and None)
    image = pipe(**tiny_flux_call(seed=1)).images
    assert np.isfinite(image).all()
    assert seen["transformer"] == "cuda"
    assert dev(pipe.transformer) == "cpu" and dev(pipe.vae) == "cuda"  # the vae's phase came last


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_apply_stays_under_the_budget_on_the_gpu():
    from diffusers import FluxTransformer2DModel

    class Pipe:  # one component is enough: what matters is the device peak while quantizing
        def __init__(self, transformer):
            self.transformer = transformer

        def __call__(self, *args, **kwargs):
            return self.transformer(*args, **kwargs)

    with torch.device("cpu"):
        tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                    attention_head_dim=128, num_attention_heads=8, joint_attention_dim=1024,
                                    pooled_projection_dim=256, axes_dims_rope=(16, 56, 56)).to(torch.bfloat16)
    bf16_bytes = sum(p.numel() * 2 for p in tr.parameters())
    pipe = Pipe(tr)
    # int8 weights (~0.5x) plus one block in bf16 and some slack: less than the bf16 model alone
    budget = int(1.1 * (estimate_bytes(tr, "int8-weight") + max(C.param_bytes(u) for _, u, _ in units(tr))))
    assert budget < bf16_bytes
    plan = plan_for(pipe, {"transformer": "int8-weight"}, budget=budget)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (base + budget + 256 * 2**20) / total))
    try:
        tierquant.apply(pipe, plan, device="cuda", progress=False)
        peak = torch.cuda.max_memory_allocated() - base
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert peak <= budget < bf16_bytes
    assert next(tr.parameters()).device.type == "cuda"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_streamed_components_generate_and_stay_on_the_host():
    pipe = tiny_flux(seed=0, dtype=torch.bfloat16)
    reference = pipe.to("cuda")(**tiny_flux_call(seed=1)).images
    pipe = tiny_flux(seed=0, dtype=torch.bfloat16)
    plan = plan_for(pipe, {"transformer": ("bf16", "streamed", False), "text_encoder_2": ("nf4", "streamed", False)})
    tierquant.apply(pipe, plan, device="cuda", progress=False)
    image = pipe(**tiny_flux_call(seed=1)).images
    assert next(pipe.transformer.transformer_blocks.parameters()).device.type == "cpu"
    assert psnr(image, reference) >= 25.0  # streaming itself changes nothing; nf4 T5 a little


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_load_on_the_gpu_quantizes_nf4_while_loading(tmp_path):
    from bitsandbytes.nn import Linear4bit
    from torchao.utils import TorchAOBaseTensor

    pipe = tiny_flux(seed=0, dtype=torch.bfloat16)
    plan = plan_for(pipe, {"transformer": ("int8-weight", "swapped", True), "text_encoder_2": "nf4"},
                    phases=[{"components": ["text_encoder", "text_encoder_2"]}, {"components": ["transformer"]},
                            {"components": ["vae"]}])
    pipe.save_pretrained(tmp_path)
    loaded = tierquant.load(tmp_path, plan, device="cuda", progress=False, local_files_only=True)
    rec = loaded._tierquant["components"]
    assert "BitsAndBytesConfig" in rec["text_encoder_2"]["quantized_on_load"]
    assert sum(isinstance(m, Linear4bit) for m in loaded.text_encoder_2.modules()) == 12
    assert isinstance(loaded.transformer.transformer_blocks[0].attn.to_q.weight, TorchAOBaseTensor)
    assert np.isfinite(loaded(**tiny_flux_call(seed=1)).images).all()


def test_inputs_of_a_swapped_component_go_where_it_computes(tiny_flux_pipe):
    """diffusers moves the VAE's latents to `get_module_execution_device(vae)` before `decode`: for a
    swapped VAE that must be the device it computes on, not the host its weights wait on."""
    from diffusers.utils.torch_utils import get_module_execution_device

    pipe = tiny_flux_pipe
    plan = plan_for(pipe, {"vae": ("bf16", "swapped", False)},
                    phases=[{"components": ["text_encoder", "text_encoder_2"]}, {"components": ["transformer"]},
                            {"components": ["vae"]}])
    sw = PhaseSwitcher(pipe, plan, C.discover(pipe), {"vae"}, torch.device("meta"))  # meta stands in for a GPU
    assert next(pipe.vae.parameters()).device.type == "cpu"
    assert get_module_execution_device(pipe.vae) == torch.device("meta")
    assert get_module_execution_device(pipe.transformer) == torch.device("cpu")  # resident: where it is
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(pipe.vae)  # what enable_model_cpu_offload does first: must not fail
    sw.remove()
    assert get_module_execution_device(pipe.vae) == torch.device("cpu")
