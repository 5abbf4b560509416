"""`tierquant run` as a diffusers user expects it: on a tiny Flux folder, on CPU.

Options reach the pipeline, file names never overwrite, the last line and the metrics file say what
the run took, and bad input is refused in one line before any weights are read.
"""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from tierquant import runner
from tierquant.cli import main
from tierquant.hardware import GiB, TARGETS


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(pipeline folder, plan file): a tiny bf16 Flux saved with save_pretrained, and a CPU plan for it."""
    import tierquant
    from tierquant.pipelines.tiny import tiny_flux, tiny_flux_call

    d = tmp_path_factory.mktemp("flux")
    pipe = tiny_flux(dtype=torch.bfloat16)
    pipe.save_pretrained(d / "pipe")
    p = tierquant.plan(pipe, budget="1GiB", measure=False, pin={"transformer": "int8-weight"}, **tiny_flux_call())
    return d / "pipe", p.save(d / "plan.json")


def run(flux, out, *args, plan=None):
    folder, made = flux
    return main(["run", str(plan or made), "--pretrained", str(folder), "--prompt", "A red cat, on a mat!",
                 "--out", str(out), *args])


def edited_plan(flux, tmp_path, **changes):
    d = json.loads(flux[1].read_text())
    for key, value in changes.items():
        d[key] = value
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(d))
    return path


def refused(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


# -- the CLI on a real (tiny) pipeline folder ---------------------------------------------------
def test_options_reach_the_pipeline_and_files_never_overwrite(flux, tmp_path, capsys):
    out, metrics = tmp_path / "images", tmp_path / "m" / "metrics.json"
    capsys.readouterr()
    assert run(flux, out, "--steps", "2", "--height", "64", "--width", "96", "--num-images", "2", "--repeat", "2",
               "--seed", "7", "--guidance-scale", "2.0", "--negative-prompt", "blurry", "--metrics", str(metrics)) == 0
    cap = capsys.readouterr()
    lines = cap.out.strip().splitlines()
    assert "FluxPipeline uses a negative prompt only with true_cfg_scale > 1" in cap.err  # said, not hidden
    names = {f"a-red-cat-on-a-mat-{seed}-{i}.png" for seed in (7, 8) for i in (0, 1)}
    assert {p.name for p in out.glob("*.png")} == names
    assert lines[:4] == [str(out / n) for n in sorted(names)]  # one plain path per line
    images = [np.asarray(Image.open(out / n)) for n in sorted(names)]
    assert all(a.shape == (64, 96, 3) for a in images)  # --height 64 --width 96 reached the pipeline
    assert len({a.tobytes() for a in images}) == 4  # two seeds x two images per prompt, all different
    assert re.fullmatch(r"4 images in \d+\.\d\d s: \d+\.\d\d s per image \(the one after the first, which took "
                        r"\d+\.\d s\), peak \d+(\.\d+)? [MG]iB on CPU", lines[-1]), lines[-1]

    m = json.loads(metrics.read_text())
    assert set(m) == set(runner.METRICS_KEYS) == {
        "load_s", "apply_s", "generation_s", "first_image_s", "seconds_per_image", "images", "peak_reserved_bytes",
        "host_peak_rss_bytes", "card", "plan", "budget_bytes", "date"}
    assert m["images"] == 4 and len(m["generation_s"]) == 2 and m["first_image_s"] == m["generation_s"][0]
    assert m["seconds_per_image"] == pytest.approx(m["generation_s"][1] / 2)
    assert m["apply_s"] is None and isinstance(m["load_s"], float)  # load() quantizes while loading
    assert m["peak_reserved_bytes"] is None and m["card"] == "cpu"
    assert isinstance(m["host_peak_rss_bytes"], int) and m["host_peak_rss_bytes"] > 0
    assert m["plan"] == str(flux[1]) and m["budget_bytes"] == GiB
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", m["date"])

    # The same seed again: a new file beside the old ones, never over them.
    before = {n: (out / n).read_bytes() for n in names}
    assert run(flux, out, "--steps", "1", "--seed", "7", "--height", "64", "--width", "64") == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == str(out / "a-red-cat-on-a-mat-7-0-2.png")
    assert printed[-1].startswith("1 image in ") and "(one generation, warm-up included)" in printed[-1]
    assert np.asarray(Image.open(printed[0])).shape == (64, 64, 3)
    assert {n: (out / n).read_bytes() for n in names} == before


@pytest.mark.parametrize("args, says", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--steps", "-3"], "--steps must be at least 1, got -3"),
    (["--height", "65"], "--height must be a positive multiple of 8"),
    (["--width", "-64"], "--width must be a positive multiple of 8"),
    (["--num-images", "0"], "--num-images must be at least 1, got 0"),
    (["--repeat", "0"], "--repeat must be at least 1, got 0"),
    (["--budget", "lots"], "cannot read budget 'lots'"),
])
def test_bad_numbers_are_refused_in_one_line(flux, tmp_path, capsys, args, says):
    out = tmp_path / "images"
    assert run(flux, out, *args) == 2
    assert says in refused(capsys)
    assert not out.exists()


def test_an_option_the_pipeline_does_not_take_is_refused_before_loading(flux, tmp_path, capsys):
    # The embedded pipeline's __call__ has neither negative_prompt nor num_images_per_prompt.
    plan = edited_plan(flux, tmp_path, pipeline={"class": "EmbeddedPipeline", "components": {}})
    out = tmp_path / "images"
    assert main(["run", str(plan), "--pipeline", "embedded", "--prompt", "x", "--negative-prompt", "blurry",
                 "--num-images", "2", "--out", str(out)]) == 2
    line = refused(capsys)
    assert "EmbeddedPipeline" in line and "--negative-prompt" in line and "--num-images" in line
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU plan runs on a GPU machine")
def test_a_gpu_plan_is_refused_on_a_cpu_only_machine(flux, tmp_path, capsys):
    plan = edited_plan(flux, tmp_path, hardware=TARGETS["h100"].to_dict())
    out = tmp_path / "images"
    assert run(flux, out, "--steps", "1", plan=plan) == 2
    line = refused(capsys)
    assert "h100" in line and "CPU" in line and "tierquant plan" in line and "--target cpu" in line
    assert not out.exists()


# -- the pure parts ----------------------------------------------------------------------------
def test_device_mismatch():
    h200 = {"device": "cuda", "name": "h200"}
    cpu = {"device": "cpu", "name": "cpu"}
    err, warn = runner.device_mismatch(TARGETS["rtx4090"].to_dict(), h200)
    assert err is None and warn == ("warning: this plan was made for rtx4090; running on h200 "
                                    "(its predictions are for the rtx4090)")
    err, warn = runner.device_mismatch(TARGETS["h100"].to_dict(), cpu)
    assert warn is None and "CUDA GPU (h100)" in err and "the CPU" in err
    err, warn = runner.device_mismatch(TARGETS["cpu"].to_dict(), TARGETS["h200"])
    assert warn is None and "made for the CPU" in err and "(h200)" in err
    assert runner.device_mismatch(TARGETS["h200"].to_dict(), h200) == (None, None)
    assert runner.device_mismatch({"name": "cpu", "capability": None}, cpu) == (None, None)  # no "device" key


def test_pipeline_kwargs_pass_only_what_was_given_and_the_pipeline_takes():
    from diffusers import FluxPipeline

    from tierquant.pipelines.embedded import EmbeddedPipeline

    flux = runner.accepted_arguments(FluxPipeline.__call__)
    assert runner.pipeline_kwargs(flux, "FluxPipeline", "a cat") == {"prompt": "a cat", "output_type": "pil"}
    kw = runner.pipeline_kwargs(flux, "FluxPipeline", "a cat", steps=3, height=64, width=128, guidance_scale=2.5,
                                negative_prompt="dog", num_images=2, seed_given=True)
    assert kw == {"prompt": "a cat", "num_inference_steps": 3, "height": 64, "width": 128, "guidance_scale": 2.5,
                  "negative_prompt": "dog", "num_images_per_prompt": 2, "output_type": "pil"}
    embedded = runner.accepted_arguments(EmbeddedPipeline.__call__)
    assert runner.pipeline_kwargs(embedded, "EmbeddedPipeline", "x", guidance_scale=1.0)["guidance_scale"] == 1.0
    with pytest.raises(runner.UnsupportedOptionError, match="EmbeddedPipeline does not take --num-images"):
        runner.pipeline_kwargs(embedded, "EmbeddedPipeline", "x", num_images=2)


def test_slug_and_unique_path(tmp_path):
    assert runner.slug("A photo of a café cat!") == "a-photo-of-a-cafe-cat"
    long = runner.slug("a very long prompt about a dragon flying over snowy mountains at dawn")
    assert len(long) <= 40 and long == "a-very-long-prompt-about-a-dragon-flying"
    assert runner.slug("x" * 60) == "x" * 40
    assert runner.slug("日本の猫") == "image"
    assert runner.unique_path(tmp_path, "cat-0-0") == tmp_path / "cat-0-0.png"
    (tmp_path / "cat-0-0.png").touch()
    (tmp_path / "cat-0-0-2.png").touch()
    assert runner.unique_path(tmp_path, "cat-0-0") == tmp_path / "cat-0-0-3.png"


def test_seconds_per_image_and_the_last_line():
    assert runner.seconds_per_image([10.0, 2.0, 4.0, 3.0], 1) == (3.0, "median of 3 after the first, which took 10.0 s")
    assert runner.seconds_per_image([5.0], 2) == (2.5, "one generation, warm-up included")
    line = runner.summary_line(4, [10.0, 2.0, 4.0, 3.0], 1, 20 * GiB, "NVIDIA H200")
    assert line == ("4 images in 19.00 s: 3.00 s per image (median of 3 after the first, which took 10.0 s), "
                    "peak 20.00 GiB on NVIDIA H200")


def test_step_hook_counts_scheduler_steps_where_there_is_no_callback():
    class Scheduler:
        def step(self, x):
            return x + 1

    class Pipe:
        scheduler = Scheduler()

    pipe, count = Pipe(), []
    with runner._step_hook(pipe, {"prompt"}, lambda: count.append(1)) as extra:
        assert extra == {} and pipe.scheduler.step(1) == 2 and pipe.scheduler.step(2) == 3
    assert len(count) == 2 and "step" not in vars(pipe.scheduler)  # the wrapper is gone afterwards
    with runner._step_hook(pipe, {"prompt", "callback_on_step_end"}, lambda: count.append(1)) as extra:
        assert extra["callback_on_step_end"](pipe, 0, 0, {"k": 1}) == {"k": 1}
    assert len(count) == 3


def test_compile_refuses_a_plan_that_compiles_nothing(tmp_path, capsys):
    import tierquant
    from tierquant.cli import main
    from tierquant.pipelines.tiny import tiny_flux, tiny_flux_call

    pipe = tiny_flux(dtype=torch.bfloat16)
    pipe.save_pretrained(tmp_path / "pipe")
    plan = tierquant.plan(pipe, budget="1GiB", measure=False, **tiny_flux_call()).save(tmp_path / "plan.json")
    assert not any(c.compile for c in tierquant.Plan.load(plan).components.values())  # a CPU plan
    assert main(["compile", str(plan), "--pretrained", str(tmp_path / "pipe")]) == 2
    err = capsys.readouterr().err
    assert "compiles no component" in err and "Traceback" not in err


def test_compile_saves_artifacts_and_makes_packages_only_when_asked(tmp_path, capsys):
    """`tierquant compile` compiles once and saves torch's artifacts beside the plan; ahead-of-time
    packages only with --packages (on an H100 graph packages started a later process slower than the
    artifacts alone: docs/compile.md). A kind that does not exist is refused before any weights are read."""
    import tierquant
    from tierquant import compilation
    from tierquant.pipelines.tiny import tiny_flux, tiny_flux_call

    pipe = tiny_flux(dtype=torch.bfloat16)
    pipe.save_pretrained(tmp_path / "pipe")
    plan = tierquant.plan(pipe, budget="1GiB", measure=False, **tiny_flux_call())
    plan.components["transformer"].compile = True  # a CPU plan never compiles: as a GPU plan would
    path = plan.save(tmp_path / "plan.json")
    args = ["compile", str(path), "--pretrained", str(tmp_path / "pipe"), "--height", "64", "--width", "64", "--json"]
    assert main(args + ["--packages", "tensorrt"]) == 2
    assert "no package kind 'tensorrt': the kinds are graph, aoti" in refused(capsys)
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["components"]["transformer"]["mode"] == "artifacts"
    assert compilation.artifacts_path(path).stat().st_size > 0
    assert not compilation.aot_beside(path).exists()
