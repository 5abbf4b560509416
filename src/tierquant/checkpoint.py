"""Checkpoints: load a pipeline folder (or hub id) quantizing while loading, and save an applied
pipeline so that it loads back quantized."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import components as C
from .applier import BudgetGuard, Progress, finish, quantize_component, quantize_order
from .backends import backend
from .checks import block_differences, check_components_fit, check_runs_here, differences, resolve_device
from .errors import PlanError, PlanMismatchError
from .plan import Plan
from .units import units

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token")


def load(path_or_repo_id, plan: Plan, device=None, progress: bool = True, **from_pretrained_kwargs):
    """Load a pipeline checkpoint one component at a time, quantizing and placing each before the
    next is read, then place and compile it as `apply` does. Checks the plan against the
    checkpoint's configs (and, on a GPU, that it fits) before reading any weights.

    Host memory: at most one component's bf16 weights are in host memory at once, beside what the
    plan keeps there (the host copies of swapped and streamed components, `plan.host_bytes`).
    Quantization on load where the libraries can: torchao schemes through diffusers' and
    transformers' TorchAoConfig; nf4 through BitsAndBytesConfig for resident components on a GPU
    (bitsandbytes' loaders refuse a CPU-only machine, and would load a swapped or streamed component
    whole onto the GPU). Every other component loads in bf16 and is quantized unit by unit.
    """
    import gc

    from diffusers import DiffusionPipeline

    dev = resolve_device(device)
    check_runs_here(plan, dev)
    hub = {k: from_pretrained_kwargs[k] for k in _HUB_KWARGS if k in from_pretrained_kwargs}
    skeletons, libs, fp = _skeletons(DiffusionPipeline, path_or_repo_id, hub)
    diffs = differences(plan, fp) or block_differences(plan, skeletons)
    if diffs:
        raise PlanMismatchError(
            f"this plan was made for another pipeline than {path_or_repo_id}:\n  - " + "\n  - ".join(diffs) +
            "\nMake a plan for this pipeline with tierquant.plan(pipe, ...).")
    check_components_fit(skeletons, plan, dev)
    dtype = from_pretrained_kwargs.get("torch_dtype", from_pretrained_kwargs.get("dtype", torch.bfloat16))
    guard = BudgetGuard(dev, plan.budget_bytes)
    order = quantize_order(plan, skeletons)
    modules, record = {}, {}
    with Progress(progress, sum(len(units(skeletons[n])) for n in order)) as advance:
        for name in order:
            ch = plan.components[name]
            keep = {n for n, _, why in C.quantizable_layers(skeletons[name]) if why}
            # Shapes the scheme cannot pack stay out of on-load quantization as they do in apply.
            keep = sorted(keep | set(backend(ch.scheme).exclusions(skeletons[name])))
            cfg = backend(ch.scheme).load_config(libs[name], keep, ch.placement, dev)
            cls = type(skeletons[name])
            # diffusers models take `torch_dtype`, transformers 5 models `dtype`.
            dtype_kw = {"torch_dtype" if libs[name] == "diffusers" else "dtype": dtype}
            extra = {"quantization_config": cfg} if cfg is not None else {}
            module = cls.from_pretrained(path_or_repo_id, subfolder=name, **dtype_kw, **extra, **hub)
            module.eval()
            record[name] = quantize_component(module, ch, dev, guard, advance)
            if cfg is not None:
                record[name]["quantized_on_load"] = type(cfg).__module__.split(".")[0] + "." + type(cfg).__name__
            modules[name] = module
            gc.collect()  # the component's bf16 host copy goes before the next one is read
    # The rest (tokenizers, scheduler) from the folder; the components as loaded above.
    pipe = DiffusionPipeline.from_pretrained(path_or_repo_id, **modules, **hub)
    return finish(pipe, plan, record, dev, guard)


def _skeletons(DiffusionPipeline, path, hub: dict):
    """Each torch component of a checkpoint built on the meta device from its config (no weights
    read), its library, and the pipeline's fingerprint."""
    import importlib

    from accelerate import init_empty_weights

    index = DiffusionPipeline.load_config(path, **hub)
    skeletons, libs, comps = {}, {}, {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, (list, tuple)) or len(spec) != 2 or spec[0] is None:
            continue
        lib, cls_name = spec
        try:
            cls = getattr(importlib.import_module(lib), cls_name)
        except (ImportError, AttributeError):
            continue
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            continue
        with init_empty_weights(include_buffers=False):
            if hasattr(cls, "load_config") and hasattr(cls, "from_config"):  # diffusers models
                module = cls.from_config(cls.load_config(path, subfolder=name, **hub))
            else:  # transformers models
                module = cls(cls.config_class.from_pretrained(path, subfolder=name, **hub))
        if hasattr(module, "tie_weights"):  # as from_pretrained does (T5's shared embedding); not
            module.tie_weights()  # inside init_empty_weights, where it does nothing
        skeletons[name], libs[name] = module, lib
        comps[name] = {"class": cls_name, "params": C.n_params(module)}
    return skeletons, libs, {"class": index.get("_class_name"), "components": comps}


def _library(module: nn.Module) -> str:
    return type(module).__module__.split(".")[0]


def save_applied(pipe, path) -> Path:
    """Save an applied pipeline so that `DiffusionPipeline.from_pretrained(path)` (or
    `tierquant.load(path, plan)`) loads it back quantized, without the bf16 weights.

    Components quantized after loading get the library's quantization config recorded in their
    config.json, as if they had been quantized on load. Placements and compilation are not saved:
    they are the plan's business at load time. Also writes tierquant.json: what was quantized and kept.
    Load it back with `DiffusionPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)`: without it,
    diffusers loads the components that were not quantized (the VAE, say) in float32 beside bf16 ones,
    and generation fails with "Input type (c10::BFloat16) and bias type (float) should be the same".
    """
    import json

    state = getattr(pipe, "_tierquant", None)
    if state is None:
        raise PlanError("this pipeline has no tierquant plan applied: apply one (tierquant.apply) before save_applied")
    comps = C.discover(pipe)
    bad = [f"{n} ({r['scheme']})" for n, r in state["components"].items() if not backend(r["scheme"]).saves]
    if bad:
        raise PlanError(f"cannot save {', '.join(bad)}: these schemes do not serialize (docs/apply.md)")
    path = Path(path)
    attached = []
    try:
        for name, rec in state["components"].items():
            module = comps[name]
            if rec["scheme"] == "bf16" or getattr(module, "hf_quantizer", None) is not None:
                continue
            # The config a library would have used to quantize it on load (as for a resident GPU component).
            cfg = backend(rec["scheme"]).load_config(_library(module), sorted(rec["kept"]), "resident",
                                                     torch.device("cuda"))
            attached.append(_attach_quantizer(module, cfg))
        # diffusers models holding torchao tensors can only be written with torch.save
        pipe.save_pretrained(path, safe_serialization=False)
    finally:
        for undo in attached:
            undo()
    record = {n: {k: v for k, v in r.items() if k in ("scheme", "quantized", "kept", "quantized_on_load")}
              for n, r in state["components"].items()}
    (path / "tierquant.json").write_text(json.dumps({"components": record}, indent=1) + "\n")
    return path


def _attach_quantizer(module: nn.Module, cfg):
    """Make a model quantized after loading look quantized-on-load to its library's save_pretrained;
    returns a function that takes it back."""
    if _library(module) == "diffusers":
        from diffusers.quantizers import DiffusersAutoQuantizer

        quantizer = DiffusersAutoQuantizer.from_config(cfg, pre_quantized=True)
        quantizer.offload = False  # set while loading (validate_environment); nothing is offloaded to disk
        before = module.config.get("quantization_config")
        module.register_to_config(quantization_config=cfg)

        def undo():
            module.hf_quantizer = None
            module.register_to_config(quantization_config=before)
            if before is None:
                d = dict(module._internal_dict)
                d.pop("quantization_config", None)
                from diffusers.configuration_utils import FrozenDict

                module._internal_dict = FrozenDict(d)
    else:
        from transformers.quantizers.auto import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(cfg, pre_quantized=True)
        had = hasattr(module.config, "quantization_config")
        before = getattr(module.config, "quantization_config", None)
        module.config.quantization_config = cfg

        def undo():
            module.hf_quantizer = None
            if had:
                module.config.quantization_config = before
            else:
                del module.config.quantization_config
    module.hf_quantizer = quantizer
    return undo
