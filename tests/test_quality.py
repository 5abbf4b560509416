"""Quality metrics: PSNR, SSIM, adherence, text-encoder embedding cosine, and compare()."""
import copy
import math

import numpy as np
import pytest
import torch

from tierquant import quality
from tierquant.pipelines.embedded import scenes


def _img(seed=0):
    return scenes.draw_scene(scenes.sample_spec(seed))


def test_psnr():
    a = _img()
    assert quality.psnr(a, a) == math.inf
    assert quality.psnr(a, np.clip(a + 0.1, 0, 1)) < 25
    b = np.zeros((8, 8, 3))
    assert quality.psnr(b, b + 0.1) == pytest.approx(20.0)  # MSE 0.01 -> 20 dB
    rng = np.random.default_rng(0)
    small = np.clip(a + rng.normal(0, 0.01, a.shape), 0, 1)
    big = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    assert quality.psnr(a, small) > quality.psnr(a, big) + 10


def test_ssim():
    a = _img(1)
    assert quality.ssim(a, a) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    s_small = quality.ssim(a, np.clip(a + rng.normal(0, 0.02, a.shape), 0, 1))
    s_big = quality.ssim(a, np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1))
    assert 1.0 > s_small > s_big
    assert quality.ssim(a, _img(2)) < 0.95  # another scene


def test_adherence():
    specs = [scenes.sample_spec(i) for i in range(6)]
    images = scenes.draw_scenes(specs)
    prompts = [scenes.caption(s) for s in specs]
    from tierquant.pipelines.embedded import judge

    assert quality.adherence(images, prompts, judge) == 1.0
    assert quality.adherence(images[::-1], prompts, judge) < 1.0
    assert quality.adherence(images, prompts, lambda im, p: p == prompts[0]) == pytest.approx(1 / 6)


@pytest.fixture(scope="module")
def minilm():
    from tierquant.pipelines.embedded.text import load_text_encoder, tokenize

    tok, enc = load_text_encoder(dtype=torch.float32)
    return enc, dict(tokenize(tok, ["a red circle left of a blue square", "a cyan triangle at the top"]))


def test_embedding_cosine(minilm):
    enc, inputs = minilm
    assert quality.embedding_cosine(enc, enc, **inputs) == pytest.approx(1.0, abs=1e-6)
    noisy = copy.deepcopy(enc)
    with torch.no_grad():
        for m in noisy.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.add_(torch.randn_like(m.weight) * m.weight.std() * 0.3)
    cos = quality.embedding_cosine(enc, noisy, **inputs)
    assert 0 < cos < 0.999
    bf16 = copy.deepcopy(enc).to(torch.bfloat16)
    assert quality.embedding_cosine(enc, bf16, **inputs) > 0.99


@pytest.fixture(scope="module")
def pipes():
    from tierquant.pipelines.embedded import load_embedded_pipeline

    return load_embedded_pipeline(), load_embedded_pipeline()


def test_compare_identical(pipes):
    ref, _ = pipes
    items = scenes.EVAL_SET[:4]
    r = quality.compare(ref, ref, [p for p, _ in items], [s for _, s in items])
    assert r.psnr_db == math.inf and r.ssim == pytest.approx(1.0)
    assert r.adherence_reference == r.adherence_candidate is not None  # the embedded judge, found by itself
    assert r.reference_images.shape == (4, 64, 64, 3) and len(r.psnr_per_image) == 4
    assert r.adherence_drop == 0


def test_compare_quantized_candidate(pipes):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    ref, cand = pipes
    quantize_(cand.transformer, Int8WeightOnlyConfig(),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and min(m.in_features, m.out_features) >= 64)
    items = scenes.EVAL_SET[:6]
    prompts, seeds = [p for p, _ in items], [s for _, s in items]
    r = quality.compare(ref, cand, prompts, seeds, batch_size=3)
    assert 25 < r.psnr_db < math.inf and 0.8 < r.ssim < 1.0
    assert r.adherence_candidate >= r.adherence_reference - 1 / 6
    # a reference generated once can be reused; a heavily perturbed candidate scores lower
    with torch.no_grad():
        for m in cand.vae.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.add_(torch.randn_like(m.weight) * 0.05)
    r2 = quality.compare(ref, cand, prompts, seeds, reference_images=r.reference_images)
    assert r2.psnr_db < r.psnr_db and r2.ssim < r.ssim


def test_compare_without_judge_for_other_prompts(pipes):
    ref, _ = pipes
    r = quality.compare(ref, ref, ["a photo of a cat"], [0], num_inference_steps=2)
    assert r.adherence_reference is None and r.adherence_drop is None
