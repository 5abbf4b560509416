"""Plans over several cards (devices.py, parallel.py): pure, on the built-in full-size profiles."""
import pytest

from tierquant import parallel as P
from tierquant.devices import assignments, boundary_bytes, plan_devices, sub_profile
from tierquant.errors import NoPlanError, TierquantError
from tierquant.hardware import GiB, parse_budget, target, usable_budget
from tierquant.pipelines.builtin import profile_builtin
from tierquant.planner import make_plan


def flux(size=1024):
    return profile_builtin("flux-dev", height=size, width=size, num_inference_steps=28, progress=False)


def test_two_12gib_rtx4070s_put_the_transformer_and_t5_on_cards_of_their_own():
    prof, hw, b = flux(), target("rtx4070"), parse_budget("12GiB")
    one = make_plan(prof, hw, b)
    cards = plan_devices(prof, [hw, hw], [b, b], parallel=False)
    t, t5 = cards.components["transformer"], cards.components["text_encoder_2"]
    assert (t.scheme, t.compile) == ("fp8-dynamic", True)
    assert t.device != t5.device
    # alone on its card, T5 is not speed-critical: the most faithful that fits, bf16, mostly resident
    # (bf16 whole, with the allocator's margin, is over a 12 GiB card; the streamed rest hides behind compute)
    assert t5.scheme == "bf16" and (t5.placement == "resident" or t5.resident_blocks >= 12)
    # 11.1 GiB of FP8 weights, with the allocator's margin and the activations, is more than a 12 GiB card
    # holds: the transformer keeps as many blocks as fit, more than it can beside T5 on one card.
    assert t.placement == "streamed" and t.resident_blocks > one.components["transformer"].resident_blocks
    assert cards.predicted_latency_s <= one.predicted_latency_s
    for d in cards.devices:  # the memory model holds per card
        assert d["peak_bytes"] <= usable_budget(b, hw)
    best = plan_devices(prof, [hw, hw], [b, b])  # context parallelism allowed too
    assert best.predicted_latency_s <= cards.predicted_latency_s <= one.predicted_latency_s


def test_two_16gib_cards_hold_the_transformer_whole_on_one():
    prof, hw, b = flux(), target("rtx4070ti-super"), parse_budget("16GiB")
    p = plan_devices(prof, [hw, hw], [b, b], parallel=False)
    t, t5 = p.components["transformer"], p.components["text_encoder_2"]
    assert (t.scheme, t.placement, t.compile) == ("fp8-dynamic", "resident", True)
    assert t5.device != t.device and t5.placement == "resident"
    assert p.predicted_latency_s <= make_plan(prof, hw, b).predicted_latency_s


def test_four_h100s_split_the_denoiser_at_1024_not_at_256():
    hw, b = target("h100"), parse_budget("80GiB")
    big = flux(1024)
    p = plan_devices(big, [hw] * 4, [b] * 4)
    assert p.parallel and p.parallel["component"] == "transformer" and p.parallel["degree"] >= 2
    assert p.predicted_latency_s < 0.5 * make_plan(big, hw, b).predicted_latency_s
    small = flux(256)
    q = plan_devices(small, [hw] * 4, [b] * 4)
    assert q.parallel is None
    assert q.predicted_latency_s <= make_plan(small, hw, b).predicted_latency_s


def test_context_parallel_cost_follows_the_resolution():
    hw = target("h100")
    big, small = flux(1024).components["transformer"], flux(256).components["transformer"]
    assert P.comm_seconds(big, "ulysses", 4, hw) > P.comm_seconds(small, "ulysses", 4, hw)
    # more tokens per card keep the SMs busier: smaller matmuls lose more to the last wave
    assert P.wave_factor(small, 4, hw) > P.wave_factor(big, 4, hw) >= 1.0
    assert P.why_not(big, "ulysses", 4) is None  # 24 heads
    assert "heads" in P.why_not(big, "ulysses", 16)
    assert "every denoising step" in P.why_not(flux().components["vae"], "ring", 2)
    assert P.config_kwargs({"kind": "ulysses", "degree": 4, "component": "transformer", "devices": [0, 1, 2, 3]}) \
        == {"ulysses_degree": 4}
    assert P.config_kwargs({"kind": "ring", "degree": 2, "component": "transformer", "devices": [0, 1]}) == \
        {"ring_degree": 2}


def test_identical_cards_are_tried_once():
    names = ["a", "b", "c"]
    same = assignments(names, ["x", "x"])
    assert len(same) == 4  # {abc}, {ab|c}, {ac|b}, {a|bc}
    assert len(assignments(names, ["x", "y"])) == 8
    assert len(assignments(["a", "b", "c", "d", "e"], ["x"] * 8)) == 52  # Bell(5)


def test_sub_profile_keeps_only_its_components_and_phases():
    prof = flux()
    sub = sub_profile(prof, ["vae", "text_encoder_2"])
    assert list(sub.components) == ["vae", "text_encoder_2"]
    assert [ph.components for ph in sub.phases] == [["text_encoder_2"], ["vae"]]
    assert sub.components["vae"].phase == 1 and sub.components["text_encoder_2"].phase == 0
    assert boundary_bytes(prof.components["text_encoder_2"]) >= 512 * 4096 * 2


def test_nothing_fits_says_what_to_do():
    prof, hw = flux(), target("rtx4070")
    with pytest.raises(NoPlanError, match="(vae|transformer) alone needs .* Raise that budget to at least"):
        plan_devices(prof, [hw, hw], [parse_budget("1GiB")] * 2)
    with pytest.raises(TierquantError, match="one budget per card"):
        plan_devices(prof, [hw, hw], [parse_budget("12GiB")])


def test_mixed_cards_plan_each_within_its_own_budget():
    prof = flux()
    hws, budgets = [target("rtx4090"), target("rtx4070")], [parse_budget("24GiB"), parse_budget("12GiB")]
    p = plan_devices(prof, hws, budgets)
    assert p.parallel is None  # different cards: no context parallelism
    for hw, b, d in zip(hws, budgets, p.devices):
        assert d["peak_bytes"] <= usable_budget(b, hw) and d["budget_bytes"] == b
    assert p.components["transformer"].device == 0
    assert p.predicted_peak_bytes <= 24 * GiB


# -- the front door, the command line, plan files ---------------------------------------------------
def test_api_takes_a_budget_per_card():
    import tierquant

    p = tierquant.plan("flux-dev", budget=["12GiB", "12GiB"], target="rtx4070")
    assert len(p.devices) == 2 and p.multi_device
    assert p.predicted_latency_s <= tierquant.plan("flux-dev", budget="12GiB", target="rtx4070").predicted_latency_s
    assert "card" in str(p) and "2 cards" in str(p)
    same = tierquant.plan("flux-dev", budget="12GiB,12GiB", target=["rtx4070", "rtx4070"])
    assert same.to_dict() == p.to_dict()
    one = tierquant.plan("flux-dev", budget=["12GiB"], target="rtx4070")  # a list of one is one card
    assert one.devices == [] and one.parallel is None
    assert "on 2 cards" in p.summary() and "on rtx4070" in one.summary()


def test_api_plans_a_pipeline_object_over_two_cards(tiny_flux_pipe, tiny_flux_kwargs):
    import tierquant

    p = tierquant.plan(tiny_flux_pipe, budget=["2GiB", "2GiB"], target="h100", **tiny_flux_kwargs)
    from tierquant.components import discover

    assert len(p.devices) == 2 and set(p.components) == set(discover(tiny_flux_pipe))
    assert p.predicted_latency_s <= tierquant.plan(tiny_flux_pipe, budget="2GiB", target="h100",
                                                   **tiny_flux_kwargs).predicted_latency_s


@pytest.mark.parametrize("budget, target, match", [
    (["12GiB", ""], "rtx4070", "empty entry"),
    ([], "rtx4070", "empty list"),
    (["12GiB", "12"], "rtx4070", "no unit"),
    (["12GiB", "12GiB"], ["rtx4070"], "1 targets for 2 budgets"),
    (["12GiB"] * 9, "rtx4070", "at most 8 cards"),
    (["12GiB", "12GiB"], "cpu", "CUDA GPUs"),
])
def test_bad_card_lists_say_what_to_do(budget, target, match):
    import tierquant

    with pytest.raises(TierquantError, match=match):
        tierquant.plan("flux-dev", budget=budget, target=target)


def test_budgets_for_gpus_that_are_not_here_are_refused(monkeypatch):
    import tierquant
    from tierquant import hardware

    monkeypatch.setattr(hardware, "detect_cards", lambda: [])
    with pytest.raises(TierquantError, match="torch sees 0 CUDA GPU"):
        tierquant.plan("flux-dev", budget=["12GiB", "12GiB"])


def test_cli_plans_over_two_cards_and_prints_each_components_card(tmp_path, capsys):
    from tierquant.cli import main
    from tierquant.plan import Plan

    out = tmp_path / "plan.json"
    assert main(["plan", "--pipeline", "flux-dev", "--budget", "12GiB,12GiB", "--target", "rtx4070",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "on 2 cards" in text and "card 0: peak" in text and "card 1: peak" in text
    p = Plan.load(out)
    assert len(p.devices) == 2
    assert main(["plan", "--pipeline", "flux-dev", "--budget", "12GiB,40GiB", "--target", "rtx4070"]) == 2
    assert "card 1: budget" in capsys.readouterr().err
    assert main(["plan", "--pipeline", "flux-dev", "--budget", "12GiB,12", "--target", "rtx4070"]) == 2
    assert "'12' has no unit" in capsys.readouterr().err


def test_plan_v3_round_trip_and_older_files_read_as_one_card(tmp_path):
    import json

    from tierquant.plan import PLAN_VERSION, Plan, PlanError

    hw, b = target("h100"), parse_budget("80GiB")
    p = plan_devices(flux(1024), [hw] * 4, [b] * 4)
    path = p.save(tmp_path / "p.json")
    d = json.loads(path.read_text())
    assert d["version"] == PLAN_VERSION >= 3 and d["parallel"]["degree"] == p.parallel["degree"]
    back = Plan.load(path)
    assert back.to_dict() == p.to_dict()
    assert back.rank_plan().devices == [] and back.rank_plan().parallel is None
    old = make_plan(flux(1024), hw, b).to_dict()
    old["version"] = 2
    for c in old["components"].values():
        del c["device"]
    del old["devices"], old["parallel"]
    v2 = Plan.from_dict(old)
    assert all(c.device == 0 for c in v2.components.values()) and v2.devices == [] and v2.parallel is None
    bad = dict(d, parallel={**d["parallel"], "degree": 3})
    with pytest.raises(PlanError, match="parallel"):
        Plan.from_dict(bad)
    bad = dict(d, parallel={**d["parallel"], "extra": 1})
    with pytest.raises(PlanError, match="exactly"):
        Plan.from_dict(bad)
    bad = json.loads(path.read_text())
    bad["components"]["vae"]["device"] = 7
    with pytest.raises(PlanError, match="'device' must be the index"):
        Plan.from_dict(bad)
    bad = json.loads(path.read_text())
    bad["devices"][0]["color"] = "red"
    with pytest.raises(PlanError, match="no color"):
        Plan.from_dict(bad)


def test_one_kind_of_context_parallelism_can_be_asked_for():
    hw, b = target("h100"), parse_budget("80GiB")
    p = plan_devices(flux(256), [hw] * 4, [b] * 4, parallel=("ring", 2))
    assert (p.parallel["kind"], p.parallel["degree"], p.parallel["devices"]) == ("ring", 2, [0, 1])
    with pytest.raises(NoPlanError, match="heads do not divide by 8|not that many"):
        plan_devices(flux(256), [hw] * 4, [b] * 4, parallel=("ulysses", 8))
