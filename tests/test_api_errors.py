"""Issue 12: every bad input to the public API gets a TierquantError that names what is wrong, and a
pipeline given along is left exactly as it was."""
import pytest
import torch

import tierquant
from tierquant import TierquantError
from tierquant.hardware import target
from tierquant.planner import make_plan
from tierquant.profile import ComponentProfile, Layer, Phase, Profile


@pytest.fixture(scope="module")
def pipe():
    from tierquant.pipelines.tiny import tiny_flux

    return tiny_flux(dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def good_plan(pipe):
    """A plan for `pipe` (made without running it: from its fingerprint and a synthetic profile)."""
    from tierquant.checks import fingerprint

    fp = fingerprint(pipe)
    comps = {n: ComponentProfile(n, c["class"], c["params"], 2 * c["params"], 1, {"forward": 1}, 1e6, 1e5, 0, i,
                                 layers=[Layer("l", 64, 64, 1.0)])
             for i, (n, c) in enumerate(fp["components"].items())}
    prof = Profile(fp["class"], comps, [Phase(i, [n]) for i, n in enumerate(comps)], 2, "meta")
    return make_plan(prof, target("cpu"), 1 << 40)


@pytest.fixture(scope="module")
def other_plan():
    """A plan for another pipeline (an SD3-like one)."""
    comp = ComponentProfile("transformer", "SD3Transformer2DModel", 4096, 8192, 2, {"forward": 2}, 1e6, 1e5, 0, 0,
                            layers=[Layer("l", 64, 64, 1.0)], scales_with_steps=True)
    prof = Profile("StableDiffusion3Pipeline", {"transformer": comp}, [Phase(0, ["transformer"])], 2, "meta")
    return make_plan(prof, target("cpu"), 1 << 40)


def _state(pipe) -> dict:
    return {f"{n}.{k}": v.clone() for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)
            for k, v in m.state_dict().items()}


CALL = dict(prompt="a cat", height=64, width=64, max_sequence_length=32, num_inference_steps=2)

# (id, call(pipe, good_plan, other_plan, tmp_path), words the message must contain)
CASES = [
    # profile
    ("profile-int", lambda p, g, o, t: tierquant.profile(42), ["pipeline", "int"]),
    ("profile-str", lambda p, g, o, t: tierquant.profile("x"), ["pipeline", "str"]),
    ("profile-object", lambda p, g, o, t: tierquant.profile(object()), ["pipeline", "object"]),
    ("profile-steps-0", lambda p, g, o, t: tierquant.profile(p, **{**CALL, "num_inference_steps": 0}),
     ["num_inference_steps", "0"]),
    ("profile-steps-neg", lambda p, g, o, t: tierquant.profile(p, **{**CALL, "num_inference_steps": -3}),
     ["num_inference_steps", "-3"]),
    ("profile-steps-str", lambda p, g, o, t: tierquant.profile(p, **{**CALL, "num_inference_steps": "x"}),
     ["num_inference_steps", "'x'"]),
    ("profile-unknown-option", lambda p, g, o, t: tierquant.profile(p, **CALL, sharpness=3), ["sharpness"]),
    # plan: budgets
    *[(f"plan-budget-{b!r}", (lambda b: lambda p, g, o, t: tierquant.plan(p, budget=b, **CALL))(b), ["budget"])
      for b in ["abc", -1, 0, None, "24", float("nan"), [24]]],
    # plan: pins
    ("plan-pin-component", lambda p, g, o, t: tierquant.plan(p, "1GiB", pin={"unet": "nf4"}, **CALL),
     ["unet", "transformer"]),
    ("plan-pin-scheme", lambda p, g, o, t: tierquant.plan(p, "1GiB", pin={"transformer": "int3"}, **CALL),
     ["int3", "nf4"]),
    ("plan-pin-list", lambda p, g, o, t: tierquant.plan(p, "1GiB", pin=["transformer"], **CALL), ["pin", "dict"]),
    ("plan-pin-str", lambda p, g, o, t: tierquant.plan(p, "1GiB", pin="transformer=nf4", **CALL), ["pin", "dict"]),
    ("plan-pin-value", lambda p, g, o, t: tierquant.plan(p, "1GiB", pin={"transformer": 4}, **CALL), ["pin"]),
    # plan: steps, tolerance, target, catalog, what to plan
    *[(f"plan-steps-{s!r}", (lambda s: lambda p, g, o, t: tierquant.plan(p, "1GiB", steps=s, **CALL))(s),
       ["steps", repr(s)]) for s in [0, -3, "x", 2.5, True]],
    *[(f"plan-tolerance-{x!r}", (lambda x: lambda p, g, o, t: tierquant.plan(p, "1GiB", tolerance=x, **CALL))(x),
       ["tolerance", repr(x)]) for x in [-1, "x", float("nan")]],
    ("plan-target", lambda p, g, o, t: tierquant.plan(p, "1GiB", target="voodoo5", **CALL), ["voodoo5", "rtx4090"]),
    ("plan-target-int", lambda p, g, o, t: tierquant.plan(p, "1GiB", target=4090, **CALL), ["target", "4090"]),
    ("plan-catalog", lambda p, g, o, t: tierquant.plan(p, "1GiB", catalog=["int3"], **CALL), ["catalog", "int3"]),
    ("plan-remeasure", lambda p, g, o, t: tierquant.plan(p, "1GiB", remeasure="yes", **CALL), ["remeasure"]),
    ("plan-int", lambda p, g, o, t: tierquant.plan(42, "1GiB"), ["pipeline", "int"]),
    ("plan-object", lambda p, g, o, t: tierquant.plan(object(), "1GiB"), ["pipeline", "object"]),
    ("plan-builtin", lambda p, g, o, t: tierquant.plan("x", "1GiB"), ["'x'", "flux-dev"]),
    ("plan-none", lambda p, g, o, t: tierquant.plan(None, "1GiB"), ["pipeline", "NoneType"]),
    ("plan-unknown-option", lambda p, g, o, t: tierquant.plan(p, "1GiB", sharpness=3, **CALL), ["sharpness"]),
    # apply
    ("apply-none", lambda p, g, o, t: tierquant.apply(p, None), ["Plan", "NoneType"]),
    ("apply-dict", lambda p, g, o, t: tierquant.apply(p, g.to_dict()), ["Plan", "dict", "Plan.load"]),
    ("apply-other", lambda p, g, o, t: tierquant.apply(p, o), ["another pipeline", "StableDiffusion3Pipeline"]),
    ("apply-int", lambda p, g, o, t: tierquant.apply(42, g), ["pipeline", "int"]),
    ("apply-str", lambda p, g, o, t: tierquant.apply("x", g), ["pipeline", "str"]),
    ("apply-device", lambda p, g, o, t: tierquant.apply(p, g, device="warp-drive"), ["device", "warp-drive"]),
    # load
    ("load-missing", lambda p, g, o, t: tierquant.load(str(t / "nope"), g), ["no pipeline folder", "nope"]),
    ("load-empty-folder", lambda p, g, o, t: tierquant.load(t, g), ["model_index.json"]),
    ("load-int", lambda p, g, o, t: tierquant.load(42, g), ["folder", "42"]),
    ("load-plan-none", lambda p, g, o, t: tierquant.load(str(t), None), ["Plan", "NoneType"]),
    ("load-uncached-repo", lambda p, g, o, t: tierquant.load("someone/no-such-pipeline", g),
     ["someone/no-such-pipeline"]),
    # save
    ("save-not-applied", lambda p, g, o, t: tierquant.save(p, t / "out"), ["no tierquant plan applied"]),
    ("save-int", lambda p, g, o, t: tierquant.save(42, t / "out"), ["pipeline", "int"]),
    ("save-path", lambda p, g, o, t: tierquant.save(p, 42), ["path", "42"]),
    # compare
    ("compare-int", lambda p, g, o, t: tierquant.compare(42, p, ["a cat"], [0]), ["reference", "int"]),
    ("compare-object", lambda p, g, o, t: tierquant.compare(p, object(), ["a cat"], [0]), ["candidate", "object"]),
    ("compare-prompts-int", lambda p, g, o, t: tierquant.compare(p, p, 42, [0]), ["prompts", "42"]),
    ("compare-prompts-empty", lambda p, g, o, t: tierquant.compare(p, p, [], []), ["prompts"]),
    ("compare-seeds-count", lambda p, g, o, t: tierquant.compare(p, p, ["a", "b"], [0]), ["2 prompts", "1 seeds"]),
    ("compare-seeds-str", lambda p, g, o, t: tierquant.compare(p, p, ["a"], "x"), ["seeds", "'x'"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error_and_changes_nothing(case, pipe, good_plan, other_plan, tmp_path):
    _, call, words = case
    before = _state(pipe)
    with pytest.raises(TierquantError) as e:
        call(pipe, good_plan, other_plan, tmp_path)
    message = str(e.value)
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"
    after = _state(pipe)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert getattr(pipe, "_tierquant", None) is None


def test_save_to_a_file_is_refused(pipe, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("")
    with pytest.raises(TierquantError, match="is a file"):
        tierquant.save(pipe, f)


def test_a_profile_takes_no_call_options(tmp_path):
    comp = ComponentProfile("t", "T", 4096, 8192, 2, {"forward": 2}, 1e6, 1e5, 0, 0, layers=[Layer("l", 64, 64, 1.0)])
    prof = Profile("P", {"t": comp}, [Phase(0, ["t"])], 2, "meta")
    with pytest.raises(TierquantError, match="prompt"):
        tierquant.plan(prof, "1GiB", measure=False, prompt="a cat")
    assert tierquant.plan(prof, "1GiB", measure=False, num_inference_steps=4).steps == 4
