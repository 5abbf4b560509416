"""Loading checkpoints: built-in fingerprints match what from_pretrained builds, and loading goes
one component at a time."""
import json

import pytest
import torch

import tierquant
from tierquant import checkpoint
from tierquant.checks import fingerprint
from tierquant.pipelines import builtin


def _write_configs(pipe, folder):
    """A pipeline folder with the configs alone (model_index.json and each component's config)."""
    pipe.save_config(folder)
    for name, m in pipe.components.items():
        if isinstance(m, torch.nn.Module):
            if hasattr(m, "save_config"):  # diffusers models
                m.save_config(folder / name)
            else:  # transformers models
                m.config.save_pretrained(folder / name)


@pytest.mark.parametrize("name", builtin.names())
def test_builtin_fingerprints_match_config_only_skeletons(name, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = builtin.build(name, device="meta")
    _write_configs(pipe, tmp_path)
    _, _, fp = checkpoint._skeletons(DiffusionPipeline, tmp_path, {})
    assert fp == fingerprint(pipe)


@pytest.mark.parametrize("name", ["flux-dev", "sd3.5-large"])
def test_builtin_plans_match_config_only_skeletons(name, tmp_path):
    from diffusers import DiffusionPipeline

    _write_configs(builtin.build(name, device="meta"), tmp_path)
    _, _, fp = checkpoint._skeletons(DiffusionPipeline, tmp_path, {})
    plan = tierquant.plan(name, budget="24GiB", target="h100")
    assert plan.pipeline == fp


def test_flux_plan_counts_t5_as_a_checkpoint_does(capsys):
    from tierquant.cli import main

    assert main(["plan", "--pipeline", "flux-dev", "--target", "rtx4090", "--budget", "24GiB", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["pipeline"]["components"]["text_encoder_2"]["params"] == 4_762_310_656


def test_plan_states_the_host_memory_it_needs():
    plan = tierquant.plan("flux-dev", budget="12GiB", target="rtx4090")
    off = [c for c in plan.components.values() if c.placement != "resident"]
    assert off and plan.host_bytes == sum(c.host_bytes for c in plan.components.values())
    for c in plan.components.values():  # swapped: all its weights; streamed: the blocks that stream
        assert (c.host_bytes == c.weight_bytes) if c.placement == "swapped" else \
            (0 < c.host_bytes <= c.weight_bytes) if c.placement == "streamed" else c.host_bytes == 0
    assert "host memory" in str(plan).replace("\n", " ")
    assert tierquant.plan("flux-dev", budget="80GiB", target="h100").host_bytes == 0


def test_load_reads_one_component_at_a_time(tmp_path, monkeypatch):
    from tierquant import applier
    from tierquant.pipelines.tiny import tiny_flux, tiny_flux_call

    pipe = tiny_flux(dtype=torch.bfloat16)
    pipe.save_pretrained(tmp_path / "pipe")
    plan = tierquant.plan(pipe, budget="1GiB", measure=False, pin={"transformer": "int8-weight"}, **tiny_flux_call())
    events = []
    real = applier.quantize_component

    def quantize_component(module, ch, *a, **k):
        events.append(("quantize", type(module).__name__))
        return real(module, ch, *a, **k)

    monkeypatch.setattr(checkpoint, "quantize_component", quantize_component)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            cls = type(m)
            original = cls.from_pretrained.__func__

            def from_pretrained(klass, *a, __orig=original, **k):
                events.append(("load", klass.__name__))
                return __orig(klass, *a, **k)

            monkeypatch.setattr(cls, "from_pretrained", classmethod(from_pretrained))
    loaded = tierquant.load(tmp_path / "pipe", plan, device="cpu", progress=False)
    loads = [e for e in events if e[0] == "load"]
    assert len(loads) == 4
    # Each component is quantized right after it is read, before the next one is.
    assert events == [x for pair in zip(loads, [("quantize", n) for _, n in loads]) for x in pair]
    assert loaded._tierquant["components"]["transformer"]["scheme"] == "int8-weight"
