"""Compile once per block class, and start a later process from AOT packages or torch's artifacts.

CPU: graph counts with a counting backend (no inductor), the keys, the AOT > artifacts > JIT choice
with fake package files, and one real AOTInductor package of a tiny Flux block class loaded in a
fresh process. GPU (skips without CUDA): a tiny pipeline's packages give the JIT-compiled image.
"""
import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import tierquant
from tierquant import aot, aot_proof, aot_run, compilation
from tierquant.backends import quantize
from tierquant.pipelines.tiny import tiny_flux, tiny_flux_call, tiny_sd3, tiny_sd3_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_apply import plan_for, psnr  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path):
    """Packages (real or fake) go to this test's own cache, never to the suite's."""
    monkeypatch.setenv("TIERQUANT_CACHE", str(tmp_path / "cache"))


def flux_with_two_of_each(seed: int = 0, dtype=torch.bfloat16):
    """tiny_flux with a second double-stream block (the tiny one has 1 double, 2 single), its
    weights drawn again so that the two instances differ."""
    pipe = tiny_flux(seed=seed, dtype=dtype)
    blocks = pipe.transformer.transformer_blocks
    extra = copy.deepcopy(blocks[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        for p in extra.parameters():
            p.data.normal_(0, 0.05)
    blocks.append(extra)
    return pipe


class Counting:
    """A torch.compile backend that runs each graph as traced and counts the graphs."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


# -- compile once per block class ----------------------------------------------------------------
def test_each_block_class_compiles_once_for_all_its_instances(monkeypatch):
    torch._dynamo.reset()
    counting = Counting()
    monkeypatch.setattr(compilation, "DEFAULT_BACKEND", counting)
    pipe = flux_with_two_of_each()
    tr = pipe.transformer
    assert len(tr.transformer_blocks) >= 2 and len(tr.single_transformer_blocks) >= 2
    plan = plan_for(pipe, {"transformer": ("int8-weight", "resident", True)})
    tierquant.apply(pipe, plan, device="cpu", progress=False)
    classes = {type(b).__name__ for b in compilation.regions(tr)}
    assert classes == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    assert len(compilation.variants(tr, "int8-weight")) == len(classes)
    pipe(**tiny_flux_call(seed=1))  # 2 steps: every block called twice
    # fullgraph=True (a graph break would raise), and no instance or stride recompiles.
    assert len(counting.graphs) == len(classes)
    pipe(**tiny_flux_call(seed=2))
    assert len(counting.graphs) == len(classes)


def test_instances_that_differ_are_variants_compiled_once_each(monkeypatch):
    # SD3's last joint block has no context output (context_pre_only): one class, two variants,
    # and dynamo compiles two graphs whatever is done (its code takes another path).
    torch._dynamo.reset()
    counting = Counting()
    monkeypatch.setattr(compilation, "DEFAULT_BACKEND", counting)
    pipe = tiny_sd3(dtype=torch.bfloat16)
    tr = pipe.transformer
    plan = plan_for(pipe, {"transformer": ("bf16", "resident", True)})
    tierquant.apply(pipe, plan, device="cpu", progress=False)
    found = compilation.variants(tr, "bf16")
    assert [k.split("-")[0] for k in found] == ["JointTransformerBlock"] * 2
    assert [len(v) for v in found.values()] == [len(tr.transformer_blocks) - 1, 1]
    pipe(**tiny_sd3_call(seed=1))
    assert len(counting.graphs) == len(found)


def test_dense_gives_canonical_strides_without_copying_a_batch_one_slice():
    whole = torch.randn(1, 48, 8)
    part = whole[:, 32:]  # what Flux's single blocks pass on: contiguous memory, odd batch stride
    assert part.is_contiguous() and part.stride() != (128, 8, 1)
    d = compilation.dense_one(part)
    assert d.stride() == (128, 8, 1) and d.data_ptr() == part.data_ptr() and torch.equal(d, part)
    two = torch.randn(2, 48, 8)[:, 32:]  # batch 2: really scattered, so copied
    d2 = compilation.dense_one(two)
    assert d2.is_contiguous() and d2.stride() == (128, 8, 1) and torch.equal(d2, two)
    args = compilation.dense((part, (part, 3), None))
    assert args[1][0].stride() == (128, 8, 1) and args[1][1] == 3 and args[2] is None


# -- keys ------------------------------------------------------------------------------------------
def single_blocks(scheme="bf16", seed=0):
    pipe = tiny_flux(seed=seed, dtype=torch.bfloat16)
    if scheme != "bf16":
        quantize(pipe.transformer, scheme)
    return pipe.transformer.single_transformer_blocks


def test_block_key_is_shared_by_instances_and_changes_with_what_the_code_depends_on(monkeypatch):
    a, b = single_blocks()
    key = aot.block_key(a, "bf16")
    assert aot.block_key(b, "bf16") == key  # other weights, same layout: one package serves both
    assert aot.block_key(single_blocks(seed=3)[0], "bf16") == key  # other values: same package
    assert aot.block_key(a, "int8-weight") != key
    q = single_blocks("int8-weight")[0]
    assert aot.block_key(q, "bf16") != key  # the weights' layout (Int8Tensor) is in the key
    c = copy.deepcopy(a)
    c.attn.heads = c.attn.heads * 2  # a setting the code depends on
    assert aot.block_key(c, "bf16") != key
    monkeypatch.setattr(aot, "device_label", lambda: "cuda:Another Card")
    assert aot.block_key(a, "bf16") != key
    monkeypatch.undo()
    monkeypatch.setattr(aot, "versions", lambda: {"torch": "0.0"})
    assert aot.block_key(a, "bf16") != key
    assert key.startswith("FluxSingleTransformerBlock-")


def test_input_spec_keys_shapes_dtypes_and_constants():
    x = torch.zeros(1, 16, 64, dtype=torch.bfloat16)
    s1, t1 = aot.input_spec((), {"hidden_states": x, "rope": (x, x), "kw": None})
    s2, _ = aot.input_spec((), {"hidden_states": x.clone(), "rope": (x, x), "kw": None})
    s3, _ = aot.input_spec((), {"hidden_states": torch.zeros(1, 32, 64, dtype=torch.bfloat16), "rope": (x, x),
                                "kw": None})
    s4, _ = aot.input_spec((), {"hidden_states": x.float(), "rope": (x, x), "kw": None})
    s5, _ = aot.input_spec((), {"hidden_states": x, "rope": (x, x), "kw": {"scale": 0.5}})
    assert s1 == s2 and len(t1) == 3
    assert len({s1, s3, s4, s5}) == 4
    assert aot.spec_key(s1) == aot.spec_key(aot._tuplify(json.loads(json.dumps(s1))))  # survives its JSON file
    args, kwargs = aot.rebuild_call(s1, t1)
    assert args == () and kwargs["rope"][1] is t1[2] and kwargs["kw"] is None
    with pytest.raises(aot.Unsupported):
        aot.input_spec((object(),), {})


def test_layout_round_trips_quantized_weights_and_follows_replaced_tensors():
    from torchao.utils import TorchAOBaseTensor

    block = single_blocks("int8-weight")[0]
    layout = aot.Layout(block)
    assert isinstance(block.proj_out.weight, TorchAOBaseTensor)
    flat = layout.tensors(block)
    assert all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in flat)
    assert len(flat) > len(layout.names)  # each Int8Tensor is two plain tensors (data, scale)
    back = layout.rebuild(flat)
    w = back["proj_out.weight"]
    assert type(w) is type(block.proj_out.weight)
    assert torch.equal(w.dequantize(), block.proj_out.weight.dequantize())
    # A placement replaces the tensor objects a module holds: the layout reads the new ones.
    new = torch.nn.Parameter(torch.randn_like(block.norm.linear.bias), requires_grad=False)
    block.norm.linear._parameters["bias"] = new
    assert any(t is new for t in layout.tensors(block))


# -- choosing: AOT > artifacts > JIT, with fake files -------------------------------------------
def applied_tiny(monkeypatch, placement="resident"):
    monkeypatch.setattr(compilation, "DEFAULT_BACKEND", Counting())
    pipe = tiny_flux(dtype=torch.bfloat16)
    plan = plan_for(pipe, {"transformer": ("bf16", placement, True)})
    tierquant.apply(pipe, plan, device="cpu", progress=False)
    return pipe, plan


def fake_packages(root: Path, module, scheme, classes=None, spec=((), ())):
    for key in compilation.variants(module, scheme):
        if classes is not None and key.split("-")[0] not in classes:
            continue
        d = root / key
        d.mkdir(parents=True, exist_ok=True)
        name = aot.spec_key(spec)
        (d / f"{name}.pt2").write_bytes(b"not a real package")
        (d / f"{name}.json").write_text(json.dumps({"format": aot.FORMAT, "inputs": spec}))


def test_restore_without_packages_or_artifacts_compiles_just_in_time(monkeypatch, tmp_path):
    pipe, plan = applied_tiny(monkeypatch)
    before = {id(b): b._compiled_call_impl for b in compilation.regions(pipe.transformer)}
    r = compilation.restore(pipe, plan, plan_path=tmp_path / "p.json", quiet=True)
    assert r.mode == "jit" and r.components["transformer"]["mode"] == "jit"
    assert any("no AOT package" in w for w in r.components["transformer"]["why"])
    assert any("compile-cache.bin" in w for w in r.components["transformer"]["why"])
    assert {id(b): b._compiled_call_impl for b in compilation.regions(pipe.transformer)} == before


def test_restore_loads_artifacts_when_there_are_no_packages(monkeypatch, tmp_path):
    pipe, plan = applied_tiny(monkeypatch)
    plan_path = tmp_path / "p.json"
    compilation.artifacts_path(plan_path).write_bytes(b"artifacts")
    loaded = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda b: loaded.append(b))
    r = compilation.restore(pipe, plan, plan_path=plan_path, quiet=True)
    assert r.mode == "artifacts" and loaded == [b"artifacts"]

    def broken(b):
        raise RuntimeError("stale")
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", broken)
    r = compilation.restore(pipe, plan, plan_path=plan_path, quiet=True)
    assert r.mode == "jit" and any("stale" in w for w in r.components["transformer"]["why"])


def test_restore_prefers_packages_beside_the_plan_and_needs_every_class(monkeypatch, tmp_path):
    pipe, plan = applied_tiny(monkeypatch)
    plan_path = tmp_path / "p.json"
    compilation.artifacts_path(plan_path).write_bytes(b"artifacts")
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda b: None)
    tr = pipe.transformer
    fake_packages(compilation.aot_beside(plan_path), tr, "bf16", classes={"FluxSingleTransformerBlock"})
    r = compilation.restore(pipe, plan, plan_path=plan_path, quiet=True)
    assert r.mode == "artifacts"  # one class without a package: all or none
    assert not any(isinstance(b._compiled_call_impl, aot_run.AOTCall) for b in compilation.regions(tr))
    fake_packages(compilation.aot_beside(plan_path), tr, "bf16")
    r = compilation.restore(pipe, plan, plan_path=plan_path, quiet=True)
    assert r.mode == "aot" and r.components["transformer"]["variants"] == sorted(compilation.variants(tr, "bf16"))
    assert len(r.components["transformer"]["variants"]) == 2  # one per class
    calls = [b._compiled_call_impl for b in compilation.regions(tr)]
    assert all(isinstance(c, aot_run.AOTCall) for c in calls)
    assert all(isinstance(c.fallback, compilation.Region) for c in calls)  # the JIT call stays behind
    # Packages made for another scheme (another folder) are not taken.
    plan.components["transformer"].scheme = "int8-weight"
    compilation.uncompile_regions(tr)
    r = compilation.restore(pipe, plan, plan_path=plan_path, quiet=True)
    assert r.mode == "artifacts"


def test_restore_puts_packages_of_a_streamed_component_in_its_blocks_forward(monkeypatch, tmp_path):
    """A streamed component's blocks are compiled through `forward` so that the streaming hooks around
    each block run first: its AOT calls go there too, and come off again."""
    pipe, plan = applied_tiny(monkeypatch)
    tr = pipe.transformer
    # as `apply` arms a streamed component (streaming itself needs a GPU)
    plan.components["transformer"].placement = "streamed"
    compilation.uncompile_regions(tr)
    compilation.compile_regions(tr, fullgraph=True, hooks_outside=True)
    assert all(isinstance(vars(b)["forward"], compilation.Region) for b in compilation.regions(tr))
    fake_packages(compilation.aot_beside(tmp_path / "p.json"), tr, "bf16")
    r = compilation.restore(pipe, plan, plan_path=tmp_path / "p.json", quiet=True)
    assert r.mode == "aot", r.to_dict()
    calls = [vars(b)["forward"] for b in compilation.regions(tr)]
    assert all(isinstance(c, aot_run.AOTCall) and isinstance(c.fallback, compilation.Region) for c in calls)
    assert all(b._compiled_call_impl is None for b in compilation.regions(tr))  # the hooks stay outside
    compilation.uninstall(tr)
    assert all(isinstance(vars(b)["forward"], compilation.Region) for b in compilation.regions(tr))


def test_aot_call_falls_back_for_inputs_without_a_package_and_with_autograd():
    block = single_blocks()[0]
    seen = []
    packages = aot_run.Packages({})
    call = aot_run.AOTCall(block, aot.Layout(block), packages, fallback=lambda *a, **k: seen.append((a, k)) or "jit")
    x = torch.zeros(1, 4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert call(hidden_states=x) == "jit"
    assert call(hidden_states=x) == "jit"  # grad on
    assert (call.calls, call.fallbacks, len(seen)) == (0, 2, 2)


def test_capture_stops_once_every_class_was_called(monkeypatch):
    pipe, plan = applied_tiny(monkeypatch)
    decoded = []
    monkeypatch.setattr(pipe.vae, "decode", lambda *a, **k: decoded.append(1))
    got = compilation.capture(pipe, {"transformer": pipe.transformer}, tiny_flux_call(), {"transformer": "bf16"})
    ex = {k.split("-")[0]: e for k, e in got["transformer"].items()}
    assert set(ex) == {"FluxTransformerBlock", "FluxSingleTransformerBlock"} and len(got["transformer"]) == 2
    assert ex["FluxSingleTransformerBlock"].block is pipe.transformer.single_transformer_blocks[0]
    assert ex["FluxTransformerBlock"].kwargs["hidden_states"].shape[-1] == 64
    assert not decoded  # stopped in the first transformer call
    # The JIT calls are back, and no hook stayed.
    assert all(isinstance(b._compiled_call_impl, compilation.Region) for b in compilation.regions(pipe.transformer))
    assert all(not b._forward_pre_hooks for b in compilation.regions(pipe.transformer))


def fake_export(made: list, fail: set = frozenset()):
    """Stands in for aot.export_block: writes a fake package where the real one would go."""
    def export(ex, scheme, root=None, extra_roots=(), check=True, kind="graph"):
        cls = type(ex.block).__name__
        made.append((ex.component, cls))
        if cls in fail:
            raise RuntimeError(f"cannot export {cls}")
        spec, _ = aot.input_spec(ex.args, ex.kwargs)
        for r in [root, *extra_roots]:
            d = Path(r) / aot.block_key(ex.block, scheme)
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{aot.spec_key(spec)}.pt2").write_bytes(b"fake")
            (d / f"{aot.spec_key(spec)}.json").write_text(json.dumps({"format": aot.FORMAT, "inputs": spec}))
        d = Path(root) / aot.block_key(ex.block, scheme)
        return {"package": str(d / f"{aot.spec_key(spec)}.pt2"),
                "copies": [str(Path(r) / d.name / f"{aot.spec_key(spec)}.pt2") for r in extra_roots]}
    return export


def fake_proof(monkeypatch, errors=None, why=None):
    """Stands in for the fresh process that loads the packages (fake ones cannot load)."""
    proved = []

    def prove(cases, timeout=0):
        proved.append([c.package.parent.name.split("-")[0] for c in cases])
        return ([] if why else [errors if errors is not None else 0.0] * len(cases)), why
    monkeypatch.setattr(aot_proof, "prove", prove)
    return proved


def test_prepare_exports_each_class_once_and_installs_the_packages(monkeypatch, tmp_path):
    pipe, plan = applied_tiny(monkeypatch)
    made = []
    monkeypatch.setattr(aot, "export_block", fake_export(made))
    proved = fake_proof(monkeypatch)
    plan_path = tmp_path / "p.json"
    r = compilation.prepare(pipe, plan, tiny_flux_call(), plan_path=plan_path, quiet=True, packages="aoti")
    assert r.mode == "aot" and r.components["transformer"]["kinds"] == ["aoti"]  # described without a kind
    # all packages proven together, in one fresh process
    assert [sorted(p) for p in proved] == [["FluxSingleTransformerBlock", "FluxTransformerBlock"]]
    assert sorted(made) == [("transformer", "FluxSingleTransformerBlock"), ("transformer", "FluxTransformerBlock")]
    assert all(isinstance(b._compiled_call_impl, aot_run.AOTCall) for b in compilation.regions(pipe.transformer))
    assert len(list(compilation.aot_beside(plan_path).glob("*/*.pt2"))) == 2  # beside the plan too
    assert not compilation.artifacts_path(plan_path).exists()  # nothing compiled just in time


def test_prepare_keeps_a_class_that_does_not_export_jit_and_saves_artifacts(monkeypatch, tmp_path):
    pipe, plan = applied_tiny(monkeypatch)
    made = []
    monkeypatch.setattr(aot, "export_block", fake_export(made, fail={"FluxSingleTransformerBlock"}))
    fake_proof(monkeypatch)
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"compiled", None))
    plan_path = tmp_path / "p.json"
    r = compilation.prepare(pipe, plan, tiny_flux_call(), plan_path=plan_path, quiet=True, packages="aoti")
    t = r.components["transformer"]
    assert r.mode == "artifacts" and any("cannot export FluxSingleTransformerBlock" in w for w in t["why"])
    assert compilation.artifacts_path(plan_path).read_bytes() == b"compiled"
    assert all(isinstance(b._compiled_call_impl, compilation.Region) for b in compilation.regions(pipe.transformer))


@pytest.mark.parametrize("errors,why,reason", [
    (None, "a fresh process loading the AOT packages died with signal 11 (SIGSEGV)", "signal 11"),
    (0.5, None, "relative error 0.5"),
])
def test_packages_a_fresh_process_cannot_run_are_deleted_and_the_blocks_compile_just_in_time(
        monkeypatch, tmp_path, errors, why, reason):
    pipe, plan = applied_tiny(monkeypatch)
    monkeypatch.setattr(aot, "export_block", fake_export([]))
    monkeypatch.setattr(aot, "store_root", lambda: tmp_path / "store")
    fake_proof(monkeypatch, errors=errors, why=why)
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"compiled", None))
    plan_path = tmp_path / "p.json"
    r = compilation.prepare(pipe, plan, tiny_flux_call(), plan_path=plan_path, quiet=True, packages="aoti")
    assert r.mode == "artifacts" and any(reason in w for w in r.components["transformer"]["why"])
    assert not list((tmp_path / "store").glob("*/*.pt2")) and not list(compilation.aot_beside(plan_path).glob("*/*.pt2"))
    assert all(isinstance(b._compiled_call_impl, compilation.Region) for b in compilation.regions(pipe.transformer))
    # a later process finds nothing to load, and compiles from the artifacts
    assert compilation.restore(pipe, plan, plan_path=plan_path, quiet=True).mode == "artifacts"


def test_a_failed_proof_says_how_the_process_ended(tmp_path):
    assert aot_proof.exit_reason(-11) == "died with signal 11 (SIGSEGV)"
    assert aot_proof.exit_reason(1) == "exited with status 1"
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a package")
    errors, why = aot_proof.prove([aot_proof.Case(bad, [torch.zeros(2)], [torch.zeros(2)])])
    assert errors == [] and why.startswith("a fresh process loading the AOT packages exited with status 1")
    assert aot_proof.prove([]) == ([], None)


def test_run_restores_before_the_first_image_and_saves_artifacts_after(monkeypatch, tmp_path, capsys):
    from tierquant import runner

    monkeypatch.setattr(compilation, "DEFAULT_BACKEND", Counting())
    pipe = tiny_flux(dtype=torch.bfloat16)
    pipe.save_pretrained(tmp_path / "pipe")
    plan_path = plan_for(pipe, {"transformer": ("bf16", "resident", True)}).save(tmp_path / "plan.json")
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"compiled", None))
    loaded = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda b: loaded.append(b))
    kw = dict(pretrained=tmp_path / "pipe", steps=1, height=64, width=64, out=tmp_path / "out")
    runner.run(plan_path, "a cat", **kw)
    assert "compile: transformer: compiled at the first call" in capsys.readouterr().err
    assert compilation.artifacts_path(plan_path).read_bytes() == b"compiled" and not loaded
    runner.run(plan_path, "a cat", **kw)  # a second process would find them the same way
    assert "compile: transformer: torch's compile artifacts" in capsys.readouterr().err
    assert loaded == [b"compiled"]


# -- a real package, loaded in a fresh process ----------------------------------------------------
FRESH = textwrap.dedent("""
    import json, sys, torch
    from tierquant import aot, aot_proof, compilation
    from tierquant.backends import quantize
    from tierquant.pipelines.tiny import tiny_flux
    root, inputs = sys.argv[1], sys.argv[2]
    tr = tiny_flux(seed=0, dtype=torch.bfloat16).transformer
    quantize(tr, "int8-weight")
    got = compilation.install(tr, "int8-weight", [root])
    ex = torch.load(inputs)
    out = {"installed": {k.split("-")[0]: n for k, n in got.items()}}
    for i, b in enumerate(tr.single_transformer_blocks):
        with torch.no_grad():
            mine = b(*ex["args"], **ex["kwargs"])
            used = [b._compiled_call_impl.calls, b._compiled_call_impl.fallbacks]
            compilation.uncompile_regions(b)  # the same instance, eager
            ref = b(*ex["args"], **ex["kwargs"])
        err = lambda a, r: float((a.float() - r.float()).norm() / r.float().norm())
        out[i] = {"rel": [err(a, r) for a, r in zip(mine, ref)], "used": used,
                  "ref": [r.float().tolist() for r in ref]}
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.parametrize("kind", aot.KINDS)
def test_aot_package_of_a_block_class_serves_every_instance_in_a_fresh_process(tmp_path, kind):
    import os

    pipe = tiny_flux(seed=0, dtype=torch.bfloat16)
    quantize(pipe.transformer, "int8-weight")
    got = compilation.capture(pipe, {"transformer": pipe.transformer}, tiny_flux_call(),
                              {"transformer": "int8-weight"})
    ex = next(e for k, e in got["transformer"].items() if k.startswith("FluxSingleTransformerBlock-"))
    made = aot.export_block(ex, "int8-weight", root=tmp_path / "aot", kind=kind)
    assert Path(made["package"]).exists() and made["rel_error"] < 0.02
    assert aot.Runner(made["package"]).kind == kind
    # the same, proven in a fresh process (what `compilation.prepare` does before installing)
    errors, why = aot_proof.prove([aot_proof.case(ex, made["package"])])
    assert why is None and errors[0] < 0.02, (errors, why)
    torch.save({"args": ex.args, "kwargs": ex.kwargs}, tmp_path / "inputs.pt")
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "TIERQUANT_CACHE": str(tmp_path / "cache")}
    env.update({k: v for k, v in os.environ.items() if k.startswith(("TORCHINDUCTOR", "HOME", "TMP"))})
    proc = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "aot"), str(tmp_path / "inputs.pt")],
                          capture_output=True, text=True, env=env, timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(line[len("RESULT"):])
    assert out["installed"] == {"FluxTransformerBlock": 0, "FluxSingleTransformerBlock": 1}
    for i in ("0", "1"):
        assert out[i]["used"] == [1, 0]  # the package ran, no fallback
        assert max(out[i]["rel"]) < 0.02, out[i]["rel"]  # bf16: ~0.4% per rounding
    # The two instances have their own weights: their eager outputs differ, and each matched its own.
    a, b = (np.array(out[i]["ref"][1]) for i in ("0", "1"))
    assert np.abs(a - b).max() > 0.05


def test_prepare_makes_graph_packages_and_saves_their_compilation_for_the_next_process(tmp_path):
    """Graph packages (the default kind) are compiled by inductor in the process that loads them:
    `prepare` proves them in a fresh process, installs them, compiles them once here and saves torch's
    artifacts beside the plan, which `restore` loads first in a later process."""
    pipe = tiny_flux(seed=0, dtype=torch.bfloat16)
    plan = plan_for(pipe, {"transformer": ("bf16", "resident", True)})
    plan_path = plan.save(tmp_path / "plan.json")
    tierquant.apply(pipe, plan, progress=False)
    r = compilation.prepare(pipe, plan, tiny_flux_call(seed=1), plan_path=plan_path, quiet=True, packages="graph")
    assert r.mode == "aot", r.to_dict()
    assert r.components["transformer"]["kinds"] == ["graph"]
    assert "exported graphs" in r.lines()[0]  # the report says the first call still compiles (from cache)
    metas = [json.loads(p.read_text()) for p in compilation.aot_beside(plan_path).glob("*/*.json")]
    assert len(metas) == 2 and all(m["kind"] == "graph" and m["weights"] > 0 for m in metas)
    assert compilation.artifacts_path(plan_path).stat().st_size > 0  # what compiling the graphs made
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    pipe(**tiny_flux_call(seed=2))
    assert counters["stats"]["unique_graphs"] == graphs  # compiled once per package, not per instance
    used = compilation.usage(pipe.transformer)
    assert set(used) == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    assert all(u["aot"] > 0 and u["fallback"] == 0 for u in used.values()), used


def test_prepare_gives_a_streamed_component_graph_packages_that_run_between_the_streaming_hooks(tmp_path):
    """A streamed component's blocks get packages too: exported with their weights brought in, proven,
    and called from `forward`, so each block's weights arrive (the streaming hooks) before its package
    reads them. On the CPU the moves are host to host; the order of hooks and packages is what is tested."""
    from tierquant.streaming import BlockStreamer

    pipe = tiny_flux(seed=0, dtype=torch.bfloat16)
    plan = plan_for(pipe, {"transformer": ("bf16", "resident", False)})
    tierquant.apply(pipe, plan, progress=False)
    ref = pipe(**tiny_flux_call(seed=2)).images  # eager, resident
    tr = pipe.transformer
    streamer = BlockStreamer(tr, torch.device("cpu"), resident_blocks=1, prefetch=1)
    compilation.compile_regions(tr, fullgraph=True, hooks_outside=True)
    pipe._tierquant_streamers = {"transformer": streamer}
    plan.components["transformer"].placement, plan.components["transformer"].compile = "streamed", True
    r = compilation.prepare(pipe, plan, tiny_flux_call(seed=1), plan_path=tmp_path / "plan.json", quiet=True,
                            packages="graph")
    assert r.mode == "aot" and r.components["transformer"]["kinds"] == ["graph"], r.to_dict()
    loads = streamer.loads
    image = pipe(**tiny_flux_call(seed=2)).images
    used = compilation.usage(tr)
    assert all(u["aot"] > 0 and u["fallback"] == 0 for u in used.values()), used
    # the streamed blocks came and went around their packages (one stays sent ahead for a next call:
    # no phase switch here takes it off), and the counts add up
    assert streamer.loads > loads and streamer.on == sum(sw.on_device for sw in streamer.streamed) <= 1
    assert psnr(image, ref) >= 30  # compiled against eager, bf16


# -- GPU: the packages of a tiny pipeline give the JIT-compiled image in a fresh process ------------
GPU_FRESH = textwrap.dedent("""
    import json, sys, numpy as np, torch
    import tierquant
    from tierquant import compilation
    from tierquant.plan import Plan
    from tierquant.pipelines.tiny import tiny_flux, tiny_flux_call, tiny_sd3, tiny_sd3_call
    plan_path, out_path = sys.argv[1], sys.argv[2]
    plan = Plan.load(plan_path)
    pipe = tierquant.apply(tiny_flux(seed=0, dtype=torch.bfloat16), plan, progress=False)
    report = compilation.restore(pipe, plan, plan_path=plan_path, quiet=True)
    image = pipe(**tiny_flux_call(seed=1)).images
    np.save(out_path, image)
    from torch._dynamo.utils import counters
    print("RESULT" + json.dumps({"mode": report.mode, "usage": compilation.usage(pipe.transformer),
                                 "graphs": counters["stats"]["unique_graphs"]}), flush=True)
""")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", aot.KINDS)
@pytest.mark.parametrize("scheme", ["bf16", "fp8-dynamic"])
def test_gpu_aot_packages_give_the_jit_image_in_a_fresh_process(tmp_path, scheme, kind):
    import os

    from tierquant.hardware import detect

    if scheme == "fp8-dynamic" and not detect().has_fp8:
        pytest.skip("fp8-dynamic needs FP8 tensor cores")
    pipe = tiny_flux(seed=0, dtype=torch.bfloat16)
    plan = plan_for(pipe, {"transformer": (scheme, "resident", True)})
    plan_path = plan.save(tmp_path / "plan.json")
    tierquant.apply(pipe, plan, progress=False)
    jit = pipe(**tiny_flux_call(seed=1)).images  # inductor, just in time
    report = compilation.prepare(pipe, plan, tiny_flux_call(seed=1), plan_path=plan_path, quiet=True, packages=kind)
    assert report.mode == "aot", report.to_dict()
    assert (tmp_path / "plan.aot").is_dir()
    # faulthandler: a crash in native code (an H100, 2026-11-26: no result, no traceback) shows where
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "TIERQUANT_CACHE": str(tmp_path / "empty-cache"), "PYTHONFAULTHANDLER": "1",
           # AOTInductor checks each input's size, stride, dtype and device against the package (a
           # mismatch raises instead of crashing; an H100, 2026-11-26: signal 11 inside the call)
           "AOTI_RUNTIME_CHECK_INPUTS": "1"}
    proc = subprocess.run([sys.executable, "-c", GPU_FRESH, str(plan_path), str(tmp_path / "aot.npy")],
                          capture_output=True, text=True, env=env, timeout=600)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT")), None)
    crash = proc.stderr.find("Fatal Python error")  # faulthandler's innermost frames come first
    assert line, (f"exit {proc.returncode}\n" + proc.stdout[-2000:] + proc.stderr[max(crash - 3000, 0):crash + 3000]
                  + "\n...\n" + proc.stderr[-2000:])
    out = json.loads(line[len("RESULT"):])
    assert proc.returncode == 0, f"the fresh process gave its result, then exited with {proc.returncode}:\n{proc.stderr[-4000:]}"
    assert out["mode"] == "aot"
    # nothing of the blocks' own code compiled just in time in the fresh process: an AOTInductor
    # package compiles nothing, a graph package one graph (its exported ATen graph) per package
    assert out["graphs"] == (0 if kind == "aoti" else len(report.components["transformer"]["variants"]))
    assert all(u["aot"] > 0 and u["fallback"] == 0 for u in out["usage"].values()), out["usage"]
    db = psnr(np.load(tmp_path / "aot.npy"), jit)
    assert db >= 40, db


def test_block_key_ignores_a_hook_wrapping_forward():
    from tierquant.hooks import Hook, add_hook

    a = single_blocks()[0]
    key = aot.block_key(a, "bf16")
    add_hook(a, "someone", Hook(), ["forward"])
    assert aot.block_key(a, "bf16") == key


def test_quantizing_with_torchao_leaves_inductor_settings_as_they_were(monkeypatch):
    """torchao's configs turn on coordinate-descent tuning for the whole process by default: minutes of
    a GPU's first image, tuned again in every process (docs/compile.md). Quantizing must not."""
    import torch._inductor.config as inductor_config

    from tierquant.backends import is_quantized, quantize

    monkeypatch.setattr(inductor_config, "coordinate_descent_tuning", False)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(torch.bfloat16)
    quantize(m, "int8-weight")
    assert is_quantized(m[0])
    assert inductor_config.coordinate_descent_tuning is False
