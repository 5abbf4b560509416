"""Profile -> plan -> file on tiny real pipelines (Flux, and SD3 with three encoders and CFG)."""
import pytest

import tierquant
from tierquant.plan import Plan


@pytest.mark.parametrize("which", ["flux", "sd3"])
def test_plan_from_a_tiny_pipeline_survives_save_load_save(which, request, tmp_path):
    pipe = request.getfixturevalue(f"tiny_{which}_pipe")
    kwargs = request.getfixturevalue(f"tiny_{which}_kwargs")
    prof = tierquant.profile(pipe, **kwargs)
    plan = tierquant.plan(prof, budget="1GiB", measure=False)
    assert set(plan.components) == set(prof.components)
    assert plan.pipeline["class"] == type(pipe).__name__
    assert plan.predicted_peak_bytes <= plan.budget_bytes
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    plan.save(a)
    Plan.load(a).save(b)
    assert a.read_text() == b.read_text()
    # The per-step component is the one chosen for speed; the rest for fidelity.
    per_step = [n for n, c in prof.components.items() if c.scales_with_steps]
    assert per_step == ["transformer"]
    assert "speed-critical" in plan.components["transformer"].reason
