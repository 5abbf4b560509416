"""Issue 5's loop on the embedded pipeline: measured sensitivities steer the planner; the demo's report."""
import json

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
    assert tierquant.Plan.load(tmp_path / "plan-rtx4090-24GiB.json").hardware["name"] == "rtx4090"
    assert tierquant.Plan.load(tmp_path / "plan.json").components
