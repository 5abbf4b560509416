"""Quality of a changed (quantized, offloaded, compiled) pipeline against its reference.

Image metrics are plain numpy on float images in [0, 1] (H, W, C): PSNR, SSIM (Gaussian window, as
Wang et al. 2004 / skimage's defaults with gaussian_weights=True). Adherence is a judge's share of
correct images; for the embedded pipeline the judge is its deterministic scene checker.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .errors import TierquantError


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; inf for identical images."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(data_range ** 2 / mse)


def _gauss_filter(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian blur over the first two axes, 'valid' region only."""
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    n = 2 * radius + 1
    h = sum(k[i] * x[i:x.shape[0] - n + 1 + i] for i in range(n))
    return sum(k[i] * h[:, i:h.shape[1] - n + 1 + i] for i in range(n))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity (11x11 Gaussian window, sigma 1.5), averaged over channels; 1.0 if identical."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _gauss_filter(a), _gauss_filter(b)
    saa = _gauss_filter(a * a) - mu_a ** 2
    sbb = _gauss_filter(b * b) - mu_b ** 2
    sab = _gauss_filter(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return float(s.mean())


def adherence(images, prompts: list[str], judge: Callable) -> float:
    """Share of images that `judge(image, prompt)` accepts."""
    verdicts = [bool(judge(im, p)) for im, p in zip(images, prompts)]
    return sum(verdicts) / max(len(verdicts), 1)


@torch.no_grad()
def embedding_cosine(reference_module, candidate_module, **inputs) -> float:
    """Mean cosine similarity of per-token last_hidden_state (padding tokens excluded when an
    attention_mask is given) between two text encoders fed the same inputs."""
    ref = reference_module(**inputs).last_hidden_state.float()
    cand = candidate_module(**inputs).last_hidden_state.float().to(ref.device)
    cos = torch.nn.functional.cosine_similarity(ref, cand, dim=-1)
    mask = inputs.get("attention_mask")
    if mask is not None:
        m = mask.to(cos.device).bool()
        return float(cos[m].mean())
    return float(cos.mean())


@dataclass
class QualityReport:
    psnr_db: float  # mean over images (inf only if every image is identical)
    ssim: float
    adherence_reference: float | None  # judge's share of correct images; None without a judge
    adherence_candidate: float | None
    prompts: list[str]
    seeds: list[int]
    psnr_per_image: list[float]
    ssim_per_image: list[float]
    judged_reference: list[bool] | None = None
    judged_candidate: list[bool] | None = None
    # (N, H, W, 3) float [0, 1]; a video pipeline's (N, F, H, W, 3) (metrics per video, over its frames)
    reference_images: np.ndarray | None = field(default=None, repr=False)
    candidate_images: np.ndarray | None = field(default=None, repr=False)

    @property
    def adherence_drop(self) -> float | None:
        """Reference minus candidate adherence, in points (percent)."""
        if self.adherence_reference is None:
            return None
        return 100 * (self.adherence_reference - self.adherence_candidate)

    def summary(self) -> dict:
        d = {"psnr_db": self.psnr_db, "ssim": self.ssim, "n": len(self.prompts)}
        if self.adherence_reference is not None:
            d.update(adherence_reference=self.adherence_reference, adherence_candidate=self.adherence_candidate)
        return d


def generate(pipe, prompts: list[str], seeds: list[int], batch_size: int = 32, **call_kwargs) -> np.ndarray:
    """(N, H, W, 3) float images in [0, 1] (video pipelines: (N, F, H, W, 3) frames), in batches;
    each item seeded by its own CPU generator so the batching does not change its noise.

    Prompts go by keyword (`prompt=`): some pipelines take an image first (Flux Kontext)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ps, ss = prompts[i:i + batch_size], seeds[i:i + batch_size]
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in ss]
        out.append(_pixels(pipe(prompt=ps, generator=gens, output_type="np", **call_kwargs), pipe))
    return np.concatenate(out)


def _pixels(result, pipe) -> np.ndarray:
    """A pipeline's output as float pixels in [0, 1]: `.images` (N, H, W, C) or a video pipeline's
    `.frames` (N, F, H, W, C), as numpy arrays, tensors or (nested lists of) PIL images."""
    x = None
    for attr in ("images", "frames"):
        x = getattr(result, attr, None)
        if x is not None:
            break
    if x is None and isinstance(result, (tuple, list)) and result:  # return_dict=False
        x = result[0]
    if x is None:
        raise TierquantError(f"cannot compare the output of {type(pipe).__name__}: a {type(result).__name__} with "
                             "neither .images nor .frames")
    if torch.is_tensor(x):
        x = x.float().cpu().numpy()
    elif isinstance(x, (list, tuple)):
        x = np.stack([np.stack([np.asarray(f) for f in v]) if isinstance(v, (list, tuple)) else np.asarray(v)
                      for v in x])
    x = np.asarray(x)
    if x.dtype == np.uint8:
        x = x / 255.0
    return x.astype(np.float32)


def _item_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of one image, or of one video (F, H, W, C) over all its frames' pixels: inf only when
    every frame is identical (a mean of per-frame PSNRs would be inf as soon as one frame is)."""
    return psnr(a, b)


def _item_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of one image, or the mean SSIM of one video's frames (F, H, W, C)."""
    if a.ndim == 4:
        return float(np.mean([ssim(fa, fb) for fa, fb in zip(a, b)]))
    return ssim(a, b)


def _default_judge(pipe, prompts):
    """The embedded pipeline's judge when every prompt is one of its captions."""
    from .pipelines.embedded.pipeline import EmbeddedPipeline

    if not isinstance(pipe, EmbeddedPipeline):
        return None
    from .pipelines.embedded.judge import judge, parse

    try:
        for p in prompts:
            parse(p)
    except ValueError:
        return None
    return judge


def _check_inputs(reference_pipe, candidate_pipe, prompts, seeds, batch_size, reference_images):
    """(prompts, seeds) as lists, or a TierquantError that says what is wrong with them."""
    for what, pipe in (("reference", reference_pipe), ("candidate", candidate_pipe)):
        if pipe is None and what == "reference" and reference_images is not None:
            continue
        if not callable(pipe):
            raise TierquantError(f"the {what} pipeline is a {type(pipe).__name__}, not a pipeline: pass the "
                                 "diffusers pipelines to compare")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TierquantError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
    if seeds is None:
        seeds = list(range(len(prompts)))
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise TierquantError(f"seeds must be a list of ints, one per prompt, got {seeds!r:.80}")
    if len(seeds) != len(prompts):
        raise TierquantError(f"one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise TierquantError(f"batch_size must be a positive int, got {batch_size!r}")
    if reference_images is not None and len(reference_images) != len(prompts):
        raise TierquantError(f"reference_images holds {len(reference_images)} outputs for {len(prompts)} prompts")
    return list(prompts), [int(x) for x in seeds]


def compare(reference_pipe, candidate_pipe, prompts: list[str], seeds: list[int] | None = None,
            judge: Callable | None = None, batch_size: int = 32, keep_images: bool = True,
            reference_images: np.ndarray | None = None, **call_kwargs) -> QualityReport:
    """Generate the same (prompt, seed) images with both pipelines and compare them.

    Prompts are passed as `prompt=` (pipelines such as Flux Kontext take an image first); extra
    `call_kwargs` go to both pipelines. Video pipelines (`.frames`, (N, F, H, W, 3)) are compared
    frame by frame: a video's SSIM is the mean of its frames', its PSNR that of all its frames' pixels.
    `reference_images` (from an earlier compare's report) skips regenerating the reference.
    With no `judge`, the embedded pipeline's own judge is used when the prompts are its captions.
    Bad arguments raise TierquantError before anything is generated.
    """
    prompts, seeds = _check_inputs(reference_pipe, candidate_pipe, prompts, seeds, batch_size, reference_images)
    ref = reference_images if reference_images is not None else \
        generate(reference_pipe, prompts, seeds, batch_size, **call_kwargs)
    cand = generate(candidate_pipe, prompts, seeds, batch_size, **call_kwargs)
    if ref.shape != cand.shape:
        raise TierquantError(f"the reference and the candidate made outputs of different shapes "
                             f"({ref.shape} and {cand.shape}): compare pipelines with the same call")
    p = [_item_psnr(a, b) for a, b in zip(ref, cand)]
    s = [_item_ssim(a, b) for a, b in zip(ref, cand)]
    judge = judge or _default_judge(reference_pipe, prompts)
    jr = jc = None
    if judge is not None:
        jr = [bool(judge(im, pr)) for im, pr in zip(ref, prompts)]
        jc = [bool(judge(im, pr)) for im, pr in zip(cand, prompts)]
    return QualityReport(
        psnr_db=float(np.mean(p)), ssim=float(np.mean(s)),
        adherence_reference=None if jr is None else sum(jr) / len(jr),
        adherence_candidate=None if jc is None else sum(jc) / len(jc),
        prompts=list(prompts), seeds=[int(x) for x in seeds], psnr_per_image=p, ssim_per_image=s,
        judged_reference=jr, judged_candidate=jc,
        reference_images=ref if keep_images else None, candidate_images=cand if keep_images else None)
