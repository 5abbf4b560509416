"""The planner as a pure function: synthetic profiles in, plans out. No pipeline, no device."""
import json
import math

import pytest

from tierquant.hardware import GiB, HardwareError, parse_budget, target
from tierquant.plan import Plan, PlanError
from tierquant.cost import price
from tierquant.planner import NoPlanError, make_plan
from tierquant.profile import ComponentProfile, Layer, Phase, Profile
from tierquant.schemes import CATALOG, SchemeError


def comp(name, params, flops, calls, phase, act=0, kept=0, steps=False, blocks=("Block",)):
    side = int(math.sqrt(params - kept))
    layers = [Layer("proj", side, side, 4096.0)]
    if kept:
        k = int(math.sqrt(kept))
        layers.append(Layer("wo", k, k, 512.0, keep="the model keeps it in fp32"))
    return ComponentProfile(name, name.title(), params, params * 2, calls, {"forward": calls}, flops, flops * 0.8,
                            act, phase, None, layers, params // 50, list(blocks), steps)


def flux_like() -> Profile:
    """Flux.1-dev's shape, in round numbers (docs/measurements.md)."""
    return Profile("FluxPipeline", {
        "text_encoder": comp("text_encoder", int(123e6), 2 * 123e6 * 77, 1, 0, act=50 << 20),
        "text_encoder_2": comp("text_encoder_2", int(4.76e9), 4.9e12, 1, 1, act=300 << 20, kept=int(1e9)),
        "transformer": comp("transformer", int(11.9e9), 74.4e12, 28, 2, act=1 << 30, steps=True),
        "vae": comp("vae", int(84e6), 10.5e12, 1, 3, act=int(2.57 * GiB), blocks=()),
    }, [Phase(0, ["text_encoder"]), Phase(1, ["text_encoder_2"]), Phase(2, ["transformer"]), Phase(3, ["vae"])],
        28, "meta")


def schemes_of(plan):
    return {n: c.scheme for n, c in plan.components.items()}


def test_flux_on_4090_follows_the_published_recipe():
    p = make_plan(flux_like(), target("rtx4090"), parse_budget("24GiB"))
    t = p.components["transformer"]
    # FP8, compiled, most of it on the device (a few blocks may stream behind the compute, to make
    # room for a more faithful T5), and at least as fast as the recipe itself by the same cost model.
    assert (t.scheme, t.compile) == ("fp8-dynamic", True)
    assert t.placement == "resident" or (t.placement == "streamed" and t.resident_blocks >= 0.6 * 100)
    t5 = p.components["text_encoder_2"].scheme
    assert t5 == "bf16" or CATALOG[t5].weight_only
    recipe = {n: ("bf16", "resident", False) for n in p.components}
    recipe.update(transformer=("fp8-dynamic", "resident", True), text_encoder_2=("nf4", "resident", False))
    assert p.predicted_latency_s <= price(flux_like(), target("rtx4090"), recipe)[0] * 1.01
    assert p.predicted_peak_bytes <= 24 * GiB
    assert t.rejected and t.rejected["why"]


def test_no_fp8_dynamic_without_fp8_tensor_cores():
    p = make_plan(flux_like(), target("rtx3090"), parse_budget("24GiB"))
    assert "fp8-dynamic" not in schemes_of(p).values()
    assert any("fp8-dynamic not considered" in n for n in p.notes)


@pytest.mark.parametrize("card", ["rtx4090", "h100", "rtx3090"])
def test_latency_never_grows_with_budget_and_peaks_fit(card):
    last = math.inf
    for b in (8, 12, 16, 24, 32, 48):
        p = make_plan(flux_like(), target(card), b * GiB)
        assert p.predicted_peak_bytes <= b * GiB
        assert max(ph["peak_bytes"] for ph in p.phases) <= p.predicted_peak_bytes
        assert p.predicted_latency_s <= last + 1e-9
        last = p.predicted_latency_s


def test_impossible_budget_names_the_smallest_plan():
    with pytest.raises(NoPlanError) as e:
        make_plan(flux_like(), target("rtx4090"), parse_budget("1GiB"))
    need = e.value.smallest_bytes
    assert need > 1 * GiB
    assert f"{need / GiB:.2f} GiB" in str(e.value)
    # ... and that smallest plan really fits the budget it names.
    make_plan(flux_like(), target("rtx4090"), need + 1)


def test_pin_fixes_a_scheme_and_the_rest_is_optimised():
    p = make_plan(flux_like(), target("h100"), parse_budget("24GiB"), pin={"transformer": "int8-weight"})
    assert p.components["transformer"].scheme == "int8-weight"
    with pytest.raises(SchemeError, match="fp8-dynamic.*cpu|cpu.*fp8-dynamic"):
        make_plan(flux_like(), target("cpu"), parse_budget("64GiB"), pin={"transformer": "fp8-dynamic"})
    with pytest.raises(ValueError, match="no such component"):
        make_plan(flux_like(), target("h100"), parse_budget("24GiB"), pin={"unet": "nf4"})


def test_tolerance_excludes_schemes_by_expected_error():
    p = make_plan(flux_like(), target("rtx4090"), parse_budget("12GiB"), tolerance=0.01)
    assert "nf4" not in schemes_of(p).values()
    assert all(c.expected_error <= 0.01 for c in p.components.values())


def test_measured_sensitivity_overrides_priors():
    prof = flux_like()
    prof.sensitivity = {"text_encoder_2": {"int8-weight": 0.2, "fp8-weight": 0.0001}}
    # without bf16 in the catalog for it (bf16 would fit and be as faithful): fp8-weight is within the
    # tolerance by its measured error, int8 is not by its measured error
    p = make_plan(prof, target("rtx4090"), parse_budget("24GiB"), tolerance=0.01,
                  catalog={k: v for k, v in CATALOG.items() if k != "bf16"})
    assert p.components["text_encoder_2"].scheme == "fp8-weight"
    assert p.components["text_encoder_2"].expected_error == pytest.approx(0.0001)


def test_cpu_plans_keep_everything_resident_and_uncompiled():
    p = make_plan(flux_like(), target("cpu"), parse_budget("64GiB"))
    assert {c.placement for c in p.components.values()} == {"resident"}
    assert not any(c.compile for c in p.components.values())


def test_plan_round_trips_through_a_file(tmp_path):
    p = make_plan(flux_like(), target("rtx4090"), parse_budget("16GiB"))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    p.save(a)
    Plan.load(a).save(b)
    assert a.read_text() == b.read_text()
    d = json.loads(a.read_text())
    for key in ("components", "predicted_latency_s", "predicted_peak_bytes", "budget_bytes"):
        assert key in d
    assert {"scheme", "placement", "compile"} <= set(d["components"]["transformer"])
    assert "transformer" in str(Plan.load(a))


@pytest.mark.parametrize("content, what", [
    ("{not json", "invalid JSON"),
    ('{"format": "something-else"}', "format"),
    ('{"format": "tierquant-plan", "version": 99}', "version 99"),
    ('{"format": "tierquant-plan", "version": 1}', "missing 'components'"),
])
def test_damaged_or_foreign_plan_files_are_refused(tmp_path, content, what):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(PlanError) as e:
        Plan.load(path)
    assert str(path) in str(e.value) and what in str(e.value)


def test_unknown_scheme_in_a_plan_file_is_refused(tmp_path):
    p = make_plan(flux_like(), target("rtx4090"), parse_budget("24GiB"))
    d = p.to_dict()
    d["components"]["vae"]["scheme"] = "int3"
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="unknown scheme 'int3'"):
        Plan.load(path)


@pytest.mark.parametrize("text, expected", [
    ("24GiB", 24 * GiB), ("16GB", 16 * 10**9), ("12000MiB", 12000 * 2**20), ("1.5 GiB", int(1.5 * GiB)),
    (123456, 123456), ("123456B", 123456),
])
def test_budgets_parse(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("bad", ["lots", "24 parsecs", "-3GiB", 0, "123456"])
def test_bad_budgets_say_how_to_write_one(bad):
    with pytest.raises(HardwareError):
        parse_budget(bad)


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(HardwareError, match="rtx4090"):
        target("voodoo5")


def test_budget_smaller_than_the_card_is_honoured():
    p = make_plan(flux_like(), target("h200"), parse_budget("16GiB"))
    assert p.predicted_peak_bytes <= 16 * GiB
    assert p.hardware["name"] == "h200"


def test_hardware_table_says_which_schemes_run_fast():
    assert "fp8-dynamic" in target("rtx4090").fast_schemes()
    assert "fp8-dynamic" not in target("rtx3090").fast_schemes()
    assert "int8-dynamic" in target("rtx3090").fast_schemes()
    for name in ("rtx3090", "rtx4070", "rtx4080", "rtx4090", "rtx5090", "l4", "l40s", "a100-40gb", "a100-80gb",
                 "h100", "h200", "cpu"):
        hw = target(name)
        assert hw.bandwidth > 0 and hw.host_link > 0 and hw.bf16_flops > 0
        assert (hw.fp8_flops > 0) == hw.has_fp8


def test_plan_for_a_builtin_keeps_the_step_count_asked_for():
    import tierquant

    assert tierquant.plan("flux-dev", budget="24GiB", target="h100", num_inference_steps=50).steps == 50
    assert tierquant.plan("flux-dev", budget="24GiB", target="h100").steps == 28


def test_timings_measured_on_one_device_are_not_used_for_another(tiny_flux_pipe, tiny_flux_kwargs, monkeypatch):
    import tierquant
    from tierquant import cache, calibrate
    from tierquant.hardware import detect

    hw = detect()
    prof = tierquant.profile(tiny_flux_pipe, **tiny_flux_kwargs)
    # A profile measured elsewhere, claiming the transformer took 1000 s a call there.
    slow = {n: c for n, c in prof.components.items()}
    slow["transformer"] = type(prof.components["transformer"])(**{**vars(prof.components["transformer"]),
                                                                   "seconds_per_call": 1000.0})
    elsewhere = type(prof)(**{**vars(prof), "components": slow, "device": "cuda:Another Card"})
    table = calibrate.timings_for(elsewhere, hw)
    assert table[("transformer", "bf16", False)] < 1.0  # its 1000 s were not taken for this device's
    here = type(prof)(**{**vars(elsewhere), "device": prof.device})
    assert calibrate.timings_for(here, hw)[("transformer", "bf16", False)] >= 1000.0 * 0.5

    # The layer table is cached per device: another device's label is a miss, measured anew.
    files = set(cache.folder("timings").glob("*.json"))
    import uuid

    other = f"cuda:Another Card {uuid.uuid4()}"  # never seen before, whatever the test cache holds
    monkeypatch.setattr(calibrate, "device_label", lambda: other)
    calibrate.timings_for(prof, hw)
    assert len(set(cache.folder("timings").glob("*.json")) - files) == 1
    monkeypatch.setattr(calibrate, "_measure", lambda *a: (_ for _ in ()).throw(AssertionError("measured again")))
    calibrate.timings_for(prof, hw)  # the same device again: from the cache


def test_a_damaged_timings_cache_entry_is_measured_again(tiny_flux_pipe, tiny_flux_kwargs):
    import tierquant
    from tierquant import cache, calibrate
    from tierquant.hardware import detect

    prof = tierquant.profile(tiny_flux_pipe, **tiny_flux_kwargs)
    hw = detect()
    calibrate.timings_for(prof, hw)
    for f in cache.folder("timings").glob("*.json"):
        f.write_text('{"half a fi')
    table = calibrate.timings_for(prof, hw)
    assert table[("transformer", "bf16", False)] > 0


def test_flux_on_a_4090_at_12gib_streams_part_of_a_compiled_fp8_transformer():
    import tierquant

    p12 = tierquant.plan("flux-dev", budget="12GiB", target="rtx4090")
    p24 = tierquant.plan("flux-dev", budget="24GiB", target="rtx4090")
    t = p12.components["transformer"]
    assert (t.scheme, t.placement, t.compile) == ("fp8-dynamic", "streamed", True)
    assert 0 < t.resident_blocks < 57 and t.prefetch >= 1
    assert p12.predicted_latency_s < 1.2 * p24.predicted_latency_s
    assert p12.predicted_peak_bytes <= 12 * GiB


@pytest.mark.parametrize("pipeline", ["flux-dev", "sd3.5-large"])
@pytest.mark.parametrize("card", ["rtx4090", "l4", "h100"])
def test_predicted_latency_never_grows_with_the_budget(pipeline, card):
    import tierquant

    last = math.inf
    for b in (6, 7, 8, 10, 12, 14, 16, 20, 24, 32, 48, 80):
        p = tierquant.plan(pipeline, budget=f"{b}GiB", target=card)
        assert p.predicted_peak_bytes <= b * GiB
        assert p.predicted_latency_s <= last, (b, p.predicted_latency_s, last)
        last = p.predicted_latency_s


def test_stream_timeline_hides_copies_behind_compute_only_as_far_as_they_fit():
    from tierquant.cost import stream_call_seconds

    assert stream_call_seconds([1, 1, 1], [0, 0, 0], 1) == 3  # all resident
    assert stream_call_seconds([1, 1, 1], [0.5, 0.5, 0.5], 1) == 3.5  # only the first copy shows
    assert stream_call_seconds([1, 1, 1], [2, 2, 2], 1) == 7  # copy-bound: the link sets the pace
    assert stream_call_seconds([1] * 4, [0, 0, 0.5, 0.5], 1) == 4  # resident blocks hide the first copy


def test_later_calls_send_their_first_blocks_behind_the_last_calls_tail():
    from tierquant.cost import stream_calls_seconds

    # the first block streams, and no resident block before it hides its copy: 2 s exposed per call...
    assert stream_calls_seconds([1] * 4, [2, 0, 0, 0], 1, 0.0, 1) == 6
    assert stream_calls_seconds([1] * 4, [2, 0, 0, 0], 1, 0.0, 2) == 12
    # ...until the streamer carries it over (from the third call): sent when block 0 had computed,
    # it arrives while blocks 1-3 compute
    assert stream_calls_seconds([1] * 4, [2, 0, 0, 0], 1, 0.0, 3) == 16
    assert stream_calls_seconds([1] * 4, [2, 0, 0, 0], 1, 0.0, 5) == 24
    # nothing to gain where the link sets the pace, or where the copy already hides
    assert stream_calls_seconds([1] * 3, [2, 2, 2], 1, 0.0, 4) == 4 * 7
    assert stream_calls_seconds([1] * 4, [0, 0, 0, 2], 1, 0.0, 3) == 3 * 4
    assert stream_calls_seconds([1] * 3, [0, 0, 0], 1, 0.5, 4) == 4 * 3.5  # `outside` once per call


def test_plan_files_of_version_1_still_load(tmp_path):
    p = make_plan(flux_like(), target("h100"), parse_budget("24GiB"))
    d = json.loads(p.to_json())
    d["version"] = 1
    for c in d["components"].values():
        c.pop("resident_blocks"), c.pop("prefetch"), c.pop("host_bytes")
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(d))
    loaded = Plan.load(path)
    assert loaded.components["transformer"].scheme == p.components["transformer"].scheme
    assert all(c.resident_blocks is None and c.prefetch == 1 for c in loaded.components.values())


def test_a_plan_for_one_image_does_not_compile_and_one_for_a_hundred_does():
    import tierquant

    one = tierquant.plan("flux-dev", budget="24GiB", target="h100", images=1)
    many = tierquant.plan("flux-dev", budget="24GiB", target="h100", images=100)
    assert not any(c.compile for c in one.components.values()) and one.compile_s == 0
    assert any(c.compile for c in many.components.values()) and many.compile_s > 0
    assert 0 < many.compile_warm_s < many.compile_s
    steady = tierquant.plan("flux-dev", budget="24GiB", target="h100")  # many images: compile pays back
    assert steady.components["transformer"].compile
    assert any("pays back after" in n for n in steady.notes)
    # The per-image figure for a few images includes the compile time spread over them.
    assert many.predicted_latency_s > steady.predicted_latency_s


def test_the_host_link_is_measured_once_per_gpu_and_not_off_one(monkeypatch):
    import torch

    from tierquant import cache, calibrate
    from tierquant.hardware import target

    assert calibrate.host_link(target("cpu")) is None  # nothing to measure on a CPU
    # A GPU whose link was measured before: the cached figure, with no copy made.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(calibrate, "device_label", lambda: "cuda:Test Card for host_link")
    path = cache.folder("link") / (cache.key({"device": "cuda:Test Card for host_link",
                                              "torch": torch.__version__}) + ".json")
    cache.write_json(path, {"bytes_per_s": 12.5e9})
    monkeypatch.setattr(torch, "empty", lambda *a, **k: pytest.fail("measured again instead of cached"))
    assert calibrate.host_link(target("h100")) == 12.5e9


@pytest.mark.parametrize("scheme", ["int8-weight", "int8-dynamic", "fp8-weight"])
def test_the_planners_bytes_for_a_quantized_component_are_what_its_tensors_take(scheme):
    """cost.bytes_under (through checks.estimate_bytes, which counts as the planner does) against the
    bytes of torchao's tensors, scales and zero points included (`Scheme.bytes_per_row`): a plan's
    host and device memory are these sums."""
    import torch
    from torch import nn

    from tierquant.backends import quantize
    from tierquant.checks import estimate_bytes
    from tierquant.tensors import module_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 128), nn.Linear(128, 640, bias=False),
                          nn.LayerNorm(640)).to(torch.bfloat16)
    predicted = estimate_bytes(model, scheme)
    quantize(model, scheme)
    assert all(type(model[i].weight) is not nn.Parameter for i in (0, 2, 3))  # torchao's tensors
    assert predicted == module_bytes(model)


def test_a_refusal_for_a_tiny_pipeline_names_a_budget_that_fits():
    """The smallest plan of a pipeline of a few MiB is stated in MiB, and the budget the message asks
    for is one the planner then accepts (it once said 'needs 0.00 GiB')."""
    import re

    import tierquant
    from tierquant.pipelines.tiny import tiny_flux, tiny_flux_call

    pipe = tiny_flux(0)
    with pytest.raises(NoPlanError) as e:
        tierquant.plan(pipe, budget=2**20, target="h100", **tiny_flux_call(0))
    msg = str(e.value)
    assert "0.00 GiB" not in msg and re.search(r"needs \d+(\.\d+)? MiB", msg)
    asked = re.search(r"at least (\S+),", msg).group(1)
    assert asked.endswith("MiB") and parse_budget(asked) >= e.value.smallest_bytes
    assert tierquant.plan(pipe, budget=asked, target="h100", **tiny_flux_call(0)).predicted_peak_bytes <= parse_budget(asked)


def test_a_streamed_blocks_compute_is_its_flops_not_its_weight():
    """Flux's double blocks hold 2.4x a single block's weights but compute about as much (each token
    goes through one of their two streams): the profile counts each block's FLOPs, and the cost model
    shares a call among blocks by them. A profile without them (before version 4) shares by weights."""
    from dataclasses import replace

    from tierquant.cost import block_shares
    from tierquant.pipelines.builtin import profile_builtin

    c = profile_builtin("flux-dev", progress=False).components["transformer"]
    assert len(c.block_flops) == len(c.blocks) == 57
    double, single = c.blocks[0][0], c.blocks[-1][0]
    assert double > 2.2 * single
    assert 0.9 < c.block_flops[0][0] / c.block_flops[-1][0] < 1.2  # the same work, by FLOPs
    assert all(0 < lin <= f for f, lin in c.block_flops)
    assert sum(f for f, _ in c.block_flops) <= c.flops_per_call * 1.0001
    hw, s = target("h100"), CATALOG["fp8-dynamic"]
    by_flops = block_shares(c, s, True, hw)
    by_weight = block_shares(replace(c, block_flops=[]), s, True, hw)
    assert 0.9 < by_flops[0] / by_flops[-1] < 1.2 and by_weight[0] / by_weight[-1] > 2.2
    assert 0.95 < sum(by_flops) <= 1.0001


def test_a_profile_from_before_block_flops_still_plans():
    from tierquant.pipelines.builtin import profile_builtin

    d = profile_builtin("flux-dev", progress=False).scaled(28).to_dict()
    for c in d["components"].values():
        del c["block_flops"]
    d["version"] = 3
    old = Profile.from_dict(d)
    assert old.components["transformer"].block_flops == []
    plan = make_plan(old, target("rtx4090"), 12 * GiB)
    assert plan.components["transformer"].placement == "streamed"


def test_spreading_by_compute_streams_copy_heavy_blocks_less_often():
    from tierquant.cost import spread_by_compute

    # equal blocks: every other one, evenly
    assert spread_by_compute([1.0] * 8, [1.0] * 8, 4.0) in ([0, 2, 4, 6], [1, 3, 5, 7])
    # Flux's shape: 4 blocks with 2.4x the bytes of the 8 after them, the same compute each
    compute, copy = [1.0] * 12, [2.4] * 4 + [1.0] * 8
    chosen = spread_by_compute(compute, copy, 0.5 * sum(copy))
    heavy = [j for j in chosen if j < 4]
    assert abs(sum(copy[j] for j in chosen) - 0.5 * sum(copy)) <= 2.4
    assert len(heavy) < 2  # the even spread (every other block) would stream 2 of the 4
    assert spread_by_compute([0.0] * 3, [1.0] * 3, 1.0) == [] and spread_by_compute([1.0] * 3, [1.0] * 3, 0.0) == []


def test_flux_at_8gib_streams_blocks_spread_by_compute_and_the_model_says_it_pays():
    """On an H100 at 8 GiB the even spread put Flux's copy-heavy double blocks together (the link
    idled 12% of the transformer's time while its compute waited 741 ms per image, 2026-12-06): the
    planner lists the blocks it streams, fewer double blocks, and prices that faster than the even
    spread of the same bytes."""
    from dataclasses import replace

    from tierquant.cost import options_for
    from tierquant.pipelines.builtin import profile_builtin

    prof = profile_builtin("flux-dev", progress=False).scaled(28)
    hw = target("h100")
    plan = make_plan(prof, hw, 8 * GiB)
    t = plan.components["transformer"]
    assert t.placement == "streamed" and t.streamed is not None
    assert len(t.streamed) == 57 - t.resident_blocks
    doubles = sum(1 for j in t.streamed if j < 19)
    assert doubles / 19 < len(t.streamed) / 57  # double blocks stream less often than blocks do overall
    opts = [o for o in options_for(prof.components["transformer"], hw, {"fp8-dynamic": CATALOG["fp8-dynamic"]},
                                   {}, None, critical=True) if o.placement == "streamed" and o.compile]
    spread = {(o.host_bytes // 2**26, o.prefetch): o for o in opts if o.streamed is not None}
    even = [o for o in opts if o.streamed is None and (o.host_bytes // 2**26, o.prefetch) in spread]
    assert even and all(spread[(o.host_bytes // 2**26, o.prefetch)].seconds <= o.seconds * 1.0001 for o in even)
    # a plan file keeps the list
    back = Plan.from_dict(json.loads(plan.to_json()))
    assert back.components["transformer"].streamed == t.streamed


@pytest.mark.parametrize("listed, placement, ok", [
    ([0, 3, 5], "streamed", True), (None, "streamed", True), ([3, 0], "streamed", False), ([1, 1], "streamed", False),
    ([-1], "streamed", False), ([0.5], "streamed", False), ([True], "streamed", False), ([], "streamed", False),
    ("0,1", "streamed", False), ([0, 1], "resident", False)])
def test_a_plan_files_list_of_streamed_blocks_is_checked(listed, placement, ok):
    import tierquant

    d = json.loads(tierquant.plan("flux-dev", budget="12GiB", target="rtx4090").to_json())
    d["components"]["transformer"]["placement"] = placement
    d["components"]["transformer"]["streamed"] = listed
    if ok:
        assert Plan.from_dict(d).components["transformer"].streamed == listed
    else:
        with pytest.raises(PlanError, match="'streamed' must be null"):
            Plan.from_dict(d)


def test_block_shares_never_add_up_to_more_than_the_call():
    from dataclasses import replace

    from tierquant.cost import block_shares
    from tierquant.pipelines.builtin import profile_builtin

    c = profile_builtin("flux-dev", progress=False).components["transformer"]
    inflated = replace(c, block_flops=[[3 * f, 3 * lin] for f, lin in c.block_flops])
    shares = block_shares(inflated, CATALOG["fp8-dynamic"], True, target("h100"))
    assert abs(sum(shares) - 1.0) < 1e-9 and len(set(round(x, 12) for x in shares[19:])) == 1
