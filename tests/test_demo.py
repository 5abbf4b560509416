"""Issue 5's loop on the embedded pipeline: measured sensitivities steer the planner; the demo's report."""
import json
import re

import pytest
import torch

import tierquant
from tierquant.hardware import target
from tierquant.planner import NoPlanError, make_plan


@pytest.fixture(scope="module")
def measured():
    from tierquant.pipelines.embedded import DEFAULT_CALL, load_embedded_pipeline
    from tierquant.pipelines.embedded.scenes import EVAL_SET
    from tierquant.sensitivity import measure

    pipe = load_embedded_pipeline()
    kw = dict(prompt=EVAL_SET[0][0], generator=torch.Generator().manual_seed(0), **DEFAULT_CALL)
    prof = tierquant.profile(pipe, **kw)
    prof.sensitivity = measure(pipe, schemes=["int8-weight", "nf4"], **{**kw, "generator": torch.Generator().manual_seed(0)})
    return prof


def test_text_encoder_embedding_cosine_is_measured_for_int8_and_nf4(measured):
    te = measured.sensitivity["text_encoder"]
    # 1 - token-embedding cosine against bf16 (docs/measurements.md: 0.9995 and 0.974 for MiniLM)
    assert 0 < te["int8-weight"] < 0.005
    assert 0.005 < te["nf4"] < 0.1
    assert te["int8-weight"] < te["nf4"]


def test_generous_budget_gives_the_text_encoder_the_better_scheme_and_a_tight_one_nf4(measured):
    cpu = target("cpu")
    catalog = {s: tierquant.schemes.CATALOG[s] for s in ("int8-weight", "nf4")}
    # The planner minimises latency; fidelity is a tolerance. One between the two measured errors
    # keeps nf4 off the text encoder (faster and smaller on this CPU, but 30x less faithful).
    between = (measured.sensitivity["text_encoder"]["int8-weight"] + measured.sensitivity["text_encoder"]["nf4"]) / 2
    generous = make_plan(measured, cpu, 1 << 40, catalog=catalog, tolerance=between)
    assert generous.components["text_encoder"].scheme == "int8-weight"
    assert generous.components["text_encoder"].expected_error == pytest.approx(measured.sensitivity["text_encoder"]["int8-weight"])
    # The tightest budget any plan fits in leaves the text encoder nothing but nf4.
    with pytest.raises(NoPlanError) as e:
        make_plan(measured, cpu, 1, catalog=catalog)
    tight = make_plan(measured, cpu, e.value.smallest_bytes, catalog=catalog)
    assert tight.components["text_encoder"].scheme == "nf4"


def test_demo_writes_its_report_and_meets_the_quality_gate(tmp_path):
    from tierquant.demo import run_demo

    q = run_demo(tmp_path)
    for name in ("report.html", "quality.json", "plan.json", "bf16-0.png", "tiered-0.png", "uniform-nf4-0.png"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert set(saved["adherence"]) == {"bf16", "tiered", "uniform-nf4"}
    assert set(saved["psnr_db"]) == {"tiered", "uniform-nf4"}
    assert q["adherence"]["bf16"] >= 0.85
    assert q["adherence"]["tiered"] >= q["adherence"]["bf16"] - 0.02
    assert q["psnr_db"]["tiered"] >= 25
    html = (tmp_path / "report.html").read_text()
    assert "tiered-0.png" in html and "RTX 4090" in html
    # Issue 12: headed HTML tables with units, the plan's reasons, no Rich boxes, no nan/inf.
    assert "<pre>" not in html and "┃" not in html and "│" not in html
    assert not re.search(r"\b(nan|inf|Infinity)\b", html, re.IGNORECASE)
    assert "identical (the reference)" in html
    assert html.count("<thead>") >= 7 and "<th>component</th>" in html
    assert "Rejected" in html and "Embeddings, norms and convolutions" in html  # report.plan_reasons
    assert re.search(r'<th class="num">int8-weight</th>', html)  # the sensitivity table has headers
    assert "<th>stage</th>" in html and re.search(r">\d+(\.\d+)? (ms|s|min)</td>", html)  # timings, a table
    assert re.search(r">\d+(\.\d+)? (KiB|MiB)</td>", html)
    assert "flux-dev" in html and "<th class=\"num\">h100</th>" in html
    if (tmp_path / "frontier.png").exists():
        assert 'src="frontier.png"' in html
    else:
        assert "matplotlib is not installed" in html
    assert tierquant.Plan.load(tmp_path / "plan-rtx4090-24GiB.json").hardware["name"] == "rtx4090"
    assert tierquant.Plan.load(tmp_path / "plan.json").components


def test_psnr_of_identical_images_reads_identical():
    from tierquant.demo import psnr_text

    assert psnr_text(float("inf")) == "identical"
    assert psnr_text(48.77) == "48.8 dB"
    assert psnr_text(float("nan")) == "-"


def test_the_frontier_skips_budgets_over_a_card_and_plots_when_it_can(tmp_path, monkeypatch):
    import tierquant.demo as demo
    from tierquant.hardware import GiB

    monkeypatch.setattr(demo, "FRONTIER_CARDS", ("l4", "rtx4090"))
    monkeypatch.setattr(demo, "FRONTIER_GIB", (1, 4, 16, 24, 32))
    from tierquant.pipelines.builtin import profile_builtin

    f = demo.budget_frontier(profile_builtin("flux-dev", num_inference_steps=28), 1, 0)
    assert [b for b, _ in f["flux-dev on rtx4090"]] == [4 * GiB, 16 * GiB, 24 * GiB]  # 1 GiB fits no plan; 32 > the card
    assert [b for b, _ in f["flux-dev on l4"]] == [4 * GiB, 16 * GiB]  # an L4 has 22.5 GiB
    assert all(s > 0 for _, s in f["flux-dev on rtx4090"])
    plot = demo._plot(f, tmp_path / "frontier.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert plot is None and not (tmp_path / "frontier.png").exists()
    else:
        assert plot == "frontier.png" and (tmp_path / "frontier.png").stat().st_size > 1000


def test_sensitivity_of_a_pipeline_held_on_the_cpu_of_a_gpu_machine_measures_cpu_schemes(monkeypatch):
    """On an H100 the demo measured a pipeline it had loaded on the CPU, with the GPU's scheme list:
    FP8 then ran on the CPU and failed. The schemes measured are those of where the components are."""
    from types import SimpleNamespace

    from tierquant.pipelines.tiny import tiny_flux, tiny_flux_call
    from tierquant.sensitivity import measure

    h100 = SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 << 30, major=9, minor=0,
                           multi_processor_count=132)
    pipe = tiny_flux(seed=0, dtype=torch.bfloat16)
    import torchao.quantization  # noqa: F401 - imported before CUDA is faked: they ask for it at import
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: h100)
    got = measure(pipe, schemes=["int8-weight", "fp8-dynamic"], components=["transformer"], **tiny_flux_call(seed=0))
    assert set(got["transformer"]) == {"bf16", "int8-weight"}
