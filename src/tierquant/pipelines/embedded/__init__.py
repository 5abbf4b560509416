"""A small, trained, Flux-shaped text-to-image pipeline shipped inside tierquant, with a deterministic judge.

    from tierquant.pipelines.embedded import load_embedded_pipeline, EVAL_SET, DEFAULT_CALL, judge

Heavy imports (diffusers, transformers) happen on first use, so `scenes` and `judge` stay importable
with torch and numpy alone (the training machine has no diffusers).
"""
from __future__ import annotations

from .judge import judge, judge_details  # noqa: F401
from .scenes import EVAL_SET, caption, draw_scene, sample_spec  # noqa: F401


def __getattr__(name):
    if name in ("EmbeddedPipeline", "load_embedded_pipeline", "DEFAULT_CALL"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
