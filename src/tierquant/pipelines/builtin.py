"""Built-in pipelines as facts, not weights: the real classes and configs, random-initialised.

    pipe = build("flux-dev", device="cuda")      # full size, bf16, random weights, built on the GPU
    prof = profile_builtin("flux-dev")           # the profile at full size, with no weights at all

`profile_builtin` runs the pipeline's own code with every component on the meta device (shapes,
no memory) and the glue (scheduler, latents, post-processing) on the CPU, so the planner gets
full-size FLOPs, Linear rows and activation peaks on a laptop in seconds. Results are cached on
disk ($TIERQUANT_CACHE, else ~/.cache/tierquant) keyed by the call and library versions.
"""
from __future__ import annotations

import dataclasses
import importlib
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .. import cache
from ..profile import Profile
from . import tiny as _tiny
from .tokenizers import clip_tokenizer, t5_tokenizer

# -- the facts -------------------------------------------------------------------------------

# CLIP ViT-L/14 text tower (FLUX.1 text_encoder; SD3 text_encoder with projection).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
              bos_token_id=0, eos_token_id=2, pad_token_id=1)
# OpenCLIP ViT-bigG/14 text tower (SD3 text_encoder_2).
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
              bos_token_id=0, eos_token_id=2, pad_token_id=1)
# google/t5-v1_1-xxl encoder (FLUX.1 text_encoder_2, SD3 text_encoder_3).
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
              layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
              tie_word_embeddings=False, use_cache=False, is_encoder_decoder=False, pad_token_id=0, eos_token_id=1)
# The 16-channel VAEs of FLUX.1 and SD3 differ only in their latent scaling.
VAE_16 = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=1024, force_upcast=True,
              use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)


@dataclass(frozen=True)
class Component:
    library: str  # "diffusers" or "transformers"
    cls: str
    config: dict

    def config_class(self):
        if self.library == "transformers":
            return getattr(importlib.import_module("transformers"), self._config_name())
        return None

    def _config_name(self) -> str:
        return {"CLIPTextModel": "CLIPTextConfig", "CLIPTextModelWithProjection": "CLIPTextConfig",
                "T5EncoderModel": "T5Config", "UMT5EncoderModel": "UMT5Config"}[self.cls]

    def make(self) -> torch.nn.Module:
        cls = getattr(importlib.import_module(self.library), self.cls)
        if self.library == "transformers":
            return cls(self.config_class()(**self.config))
        return cls(**self.config)


@dataclass(frozen=True)
class Builtin:
    name: str
    pipeline: str  # the diffusers pipeline class
    repo: str  # where the real weights are (for from_pretrained)
    models: dict[str, Component]
    tokenizers: dict[str, Callable[[], Any]]
    scheduler: tuple[str, dict]
    call: dict  # default call kwargs (the real model's recommended settings)
    tiny: Callable[..., Any] | None = None  # builds a toy-size pipeline of the same classes
    extra: dict = field(default_factory=dict)  # other constructor arguments of the pipeline

    def key(self) -> dict:
        """What identifies the facts (for the profile cache)."""
        return {"pipeline": self.pipeline, "models": {n: [c.cls, c.config] for n, c in self.models.items()},
                "scheduler": list(self.scheduler), "extra": self.extra, "tied": True}


BUILTINS: dict[str, Builtin] = {}


def _register(b: Builtin) -> None:
    BUILTINS[b.name] = b


_register(Builtin(
    name="flux-dev", pipeline="FluxPipeline", repo="black-forest-labs/FLUX.1-dev",
    models={
        "text_encoder": Component("transformers", "CLIPTextModel", CLIP_L),
        "text_encoder_2": Component("transformers", "T5EncoderModel", T5_XXL),
        "transformer": Component("diffusers", "FluxTransformer2DModel", dict(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=[16, 56, 56])),
        "vae": Component("diffusers", "AutoencoderKL", dict(VAE_16, scaling_factor=0.3611, shift_factor=0.1159)),
    },
    tokenizers={"tokenizer": lambda: clip_tokenizer(77), "tokenizer_2": lambda: t5_tokenizer(512)},
    scheduler=("FlowMatchEulerDiscreteScheduler", dict(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)),
    call=dict(prompt="a photo of a cat", height=1024, width=1024, num_inference_steps=28, guidance_scale=3.5,
              max_sequence_length=512),
    tiny=_tiny.tiny_flux,
))

_register(Builtin(
    name="sd3.5-large", pipeline="StableDiffusion3Pipeline", repo="stabilityai/stable-diffusion-3.5-large",
    models={
        "text_encoder": Component("transformers", "CLIPTextModelWithProjection", CLIP_L),
        "text_encoder_2": Component("transformers", "CLIPTextModelWithProjection", CLIP_G),
        "text_encoder_3": Component("transformers", "T5EncoderModel", T5_XXL),
        "transformer": Component("diffusers", "SD3Transformer2DModel", dict(
            sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
            num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, dual_attention_layers=[],
            qk_norm="rms_norm")),
        "vae": Component("diffusers", "AutoencoderKL", dict(VAE_16, scaling_factor=1.5305, shift_factor=0.0609)),
    },
    tokenizers={"tokenizer": lambda: clip_tokenizer(77), "tokenizer_2": lambda: clip_tokenizer(77, pad_token="!"),
                "tokenizer_3": lambda: t5_tokenizer(512)},
    scheduler=("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0)),
    call=dict(prompt="a photo of a cat", height=1024, width=1024, num_inference_steps=28, guidance_scale=3.5),
    tiny=_tiny.tiny_sd3,
))

_register(Builtin(
    name="wan2.1-t2v-14b", pipeline="WanPipeline", repo="Wan-AI/Wan2.1-T2V-14B-Diffusers",
    models={
        "text_encoder": Component("transformers", "UMT5EncoderModel", dict(
            T5_XXL, vocab_size=256384, tie_word_embeddings=False)),
        "transformer": Component("diffusers", "WanTransformer3DModel", dict(
            patch_size=[1, 2, 2], num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
            rope_max_seq_len=1024)),
        "vae": Component("diffusers", "AutoencoderKLWan", dict(
            base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
            temperal_downsample=[False, True, True])),
    },
    tokenizers={"tokenizer": lambda: t5_tokenizer(512)},
    scheduler=("UniPCMultistepScheduler", dict(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
        solver_order=2)),
    # 480p, 81 frames (5 s at 16 fps): the pipeline's defaults.
    call=dict(prompt="a photo of a cat", negative_prompt="", height=480, width=832, num_frames=81,
              num_inference_steps=50, guidance_scale=5.0, max_sequence_length=512),
))


def names() -> list[str]:
    return list(BUILTINS)


def spec(name: str) -> Builtin:
    try:
        return BUILTINS[name]
    except KeyError:
        raise KeyError(f"no built-in pipeline {name!r}; the built-ins are: {', '.join(BUILTINS)}") from None


def default_call(name: str) -> dict:
    """The call kwargs the built-in is profiled and benchmarked with (recommended settings)."""
    return dict(spec(name).call)


# -- building --------------------------------------------------------------------------------

def build(name: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16, tiny: bool = False):
    """A random-init pipeline of the built-in's real classes at full size (or toy size with `tiny`).

    device="meta": parameters and buffers on meta (shapes only; for profiling). A real device
    ("cuda", or "cpu" for offloading strategies): built on meta, then materialised directly
    there in `dtype` with a cheap random init (normal * 0.02 tiled from a fixed block, norms at 1,
    biases at 0) while keeping the buffers' real values (CLIP's position_ids, SD3's positional
    embedding): never the whole model in fp32 on the CPU.
    """
    b = spec(name)
    device = torch.device(device)
    if tiny:
        if b.tiny is None:
            raise ValueError(f"{name} has no tiny version; build it at full size on 'meta' instead.")
        return b.tiny(dtype=dtype).to(device)
    from accelerate import init_empty_weights

    models = {}
    for n, comp in b.models.items():
        # Parameters on meta; buffers computed on the target device (SD3's positional embedding is
        # 90M values: free on meta, quick on a GPU) and kept, since to_empty() leaves them garbage.
        with torch.device(device), init_empty_weights(include_buffers=False):
            m = comp.make()
        m.to(dtype=dtype).eval()
        # Tie weights as from_pretrained does (T5's shared embedding is its encoder's embed_tokens),
        # after materialising too, which gives each module its own tensor again: a tied weight
        # counted twice would make the pipeline's fingerprint disagree with every real checkpoint.
        tie_weights(m)
        models[n] = tie_weights(_materialise(m, device))
    import diffusers

    sched_cls, sched_cfg = b.scheduler
    pipe_cls = getattr(diffusers, b.pipeline)
    pipe = pipe_cls(**models, **{n: make() for n, make in b.tokenizers.items()},
                    scheduler=getattr(diffusers, sched_cls)(**sched_cfg), **b.extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tie_weights(module: torch.nn.Module) -> torch.nn.Module:
    if hasattr(module, "tie_weights"):  # transformers models; not inside init_empty_weights, where it does nothing
        module.tie_weights()
    return module


def _materialise(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if device.type == "meta":
        return module.to(device)
    buffers = {n: b for n, b in module.named_buffers()}
    module.to_empty(device=device)
    patterns: dict = {}
    with torch.no_grad():
        for n, b in module.named_buffers():
            if n in buffers:
                b.copy_(buffers[n])
        for n, p in module.named_parameters():
            if n.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)  # norm scales
            else:
                _fill_random(p, patterns)
    return module


# Not a power of two: rows of any width start at different points of the pattern.
_PATTERN = (1 << 20) + 7


def _fill_random(t: torch.Tensor, patterns: dict) -> None:
    """normal(0, 0.02) values, tiled from one fixed block: memcpy speed (0.5 s/GB on a CPU core,
    where normal_ takes 6 s/GB), and the same weights on every device. Benchmarks only need
    weights of realistic scale, not independent ones."""
    key = (t.dtype, t.device)
    if key not in patterns:
        gen = torch.Generator().manual_seed(0)
        patterns[key] = torch.randn(_PATTERN, generator=gen).mul_(0.02).to(t.dtype).to(t.device)
    src, flat = patterns[key], t.view(-1)
    full = flat.numel() // _PATTERN
    if full:
        flat[:full * _PATTERN].view(full, _PATTERN).copy_(src.expand(full, _PATTERN))
    rest = flat.numel() - full * _PATTERN
    if rest:
        flat[full * _PATTERN:].copy_(src[:rest])


# -- profiling at full size with no weights ----------------------------------------------------

def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as a GPU runs it, or None where a GPU too would take the math path.

    Mirrors the main rules of PyTorch's kernel choice (sdp_utils): flash without a mask for head
    dims up to 256 in half precision; memory-efficient otherwise, if the mask's last dimension is
    contiguous (T5's position bias is not, so T5 runs the math path on GPUs too).
    """
    q, k, v = query, key, value
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return None
    if attn_mask is None and q.shape[-1] == v.shape[-1] and q.shape[-1] <= 256 and \
            q.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False,
                                                                   scale=scale)[0]
    if attn_mask is not None:
        if attn_mask.stride(-1) != 1:
            return None
        if attn_mask.dtype == torch.bool:  # the GPU converts it to an additive bias of q's dtype
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
        attn_mask = attn_mask.to(q.dtype).expand(*q.shape[:-1], k.shape[-2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, False, dropout_p, is_causal,
                                                                  scale=scale)[0]


class _FusedAttention(TorchFunctionMode):
    """On meta, F.scaled_dot_product_attention falls back to the math path (full score matrix):
    wrong peak memory and FLOPs. Route it to the fused kernels' ops instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        query = args[0] if args else kwargs.get("query")
        if func is F.scaled_dot_product_attention and isinstance(query, torch.Tensor) and query.device.type == "meta":
            out = _attention(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


class _MetaValues(TorchDispatchMode):
    """Meta tensors have no values, but models sometimes branch on one: transformers' masks ask
    `mask.all()` to skip masking. Answer such questions as for a full, unpadded input (True, 1)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            t = args[0]
            return True if t.dtype == torch.bool else (1.0 if t.dtype.is_floating_point else 1)
        return func(*args, **(kwargs or {}))


def _map(obj, fn):
    """Apply `fn` to every tensor in nested tuples, lists, dicts and model outputs."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{f.name: _map(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return type(obj)({k: _map(v, fn) for k, v in obj.items()}) if type(obj) is not dict else \
            {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn) for v in obj)
    return obj


def _conv_workspace(func, args, out) -> int:
    """cuDNN runs half-precision convolutions on channels-first tensors as channels-last kernels,
    holding transposed copies of input and output while the op runs. Measured on an H200: Flux's
    VAE decode at 1024^2 peaks at 2.38 GiB; tensors alone give 1.50 GiB, plus this 2.375 GiB."""
    if func is not torch.ops.aten.convolution.default:
        return 0
    x = args[0]
    if x.dim() not in (4, 5) or x.dtype not in (torch.float16, torch.bfloat16) or not x.is_contiguous():
        return 0
    return x.nbytes + out.nbytes


def _meta_shim():
    from ..profiler import Shim

    return Shim(inputs=lambda args, kwargs: (_map(args, lambda t: t.to("meta")), _map(kwargs, lambda t: t.to("meta"))),
                outputs=lambda out: _map(out, lambda t: torch.zeros(t.shape, dtype=t.dtype, device="cpu")),
                device="meta", transient=_conv_workspace)


@contextmanager
def _glue_on_cpu(pipe):
    """Make the pipeline create latents, timesteps and embeddings on the CPU while its models sit on meta."""
    cls = type(pipe)
    shim_cls = type(cls.__name__, (cls,), {"_execution_device": property(lambda self: torch.device("cpu")),
                                           "__module__": cls.__module__})
    pipe.__class__ = shim_cls
    try:
        yield
    finally:
        pipe.__class__ = cls


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)  # no import of the library: a cache hit stays quick
    except PackageNotFoundError:  # on the path without its metadata
        return importlib.import_module(package).__version__


def _versions() -> dict:
    from ..profile import PROFILE_VERSION

    return {"torch": torch.__version__.split("+")[0], "diffusers": _version("diffusers"),
            "transformers": _version("transformers"), "tierquant": _version("tierquant"), "profile": PROFILE_VERSION}


def _cache_path(name: str, call: dict, dtype: torch.dtype) -> Path:
    from ..profiler import jsonable

    return cache.folder("profiles") / f"{name}-{cache.key({'spec': spec(name).key(), 'call': jsonable(call), 'dtype': str(dtype), **_versions()})}.json"


def profile_builtin(name: str, steps: int = 2, dtype: torch.dtype = torch.bfloat16, use_cache: bool = True,
                    progress: bool = True, **call_overrides) -> Profile:
    """The profile of the full-size built-in for one call of `steps` denoising steps.

    No weights needed: components run on meta under the FLOP counter and the storage tracker,
    the glue on the CPU. Scale it with `Profile.scaled(28)`; or pass `num_inference_steps` to
    get it scaled to that. Cached on disk.
    """
    from .. import profiler

    target = call_overrides.pop("num_inference_steps", None)
    if target is not None:
        return profile_builtin(name, steps=steps, dtype=dtype, use_cache=use_cache, progress=progress,
                               **call_overrides).scaled(target)
    call = {**default_call(name), **call_overrides, "num_inference_steps": steps}
    path = _cache_path(name, call, dtype)
    stored = cache.read_json(path) if use_cache else None
    if stored is not None:
        try:
            return _with_heads(Profile.from_dict(stored), name)
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable cache entry: profile again
    pipe = build(name, device="meta", dtype=dtype)
    with ExitStack() as stack:
        stack.enter_context(_glue_on_cpu(pipe))
        stack.enter_context(_FusedAttention())
        stack.enter_context(_MetaValues())
        prof, _ = profiler.run(pipe, {**call, "output_type": call.get("output_type", "pt")}, shim=_meta_shim(),
                              progress=progress)
    prof.call_kwargs = profiler.jsonable(call)
    prof.device = "meta"
    if use_cache:
        cache.write_json(path, prof.to_dict())
    return _with_heads(prof, name)


def _with_heads(prof: Profile, name: str) -> Profile:
    """Attention heads from the built-in's facts, for profiles cached before they were recorded."""
    for n, comp in spec(name).models.items():
        heads = comp.config.get("num_attention_heads", comp.config.get("num_heads", 0))
        c = prof.components.get(n)
        if c is not None and not c.attention_heads and isinstance(heads, int):
            prof.components[n] = dataclasses.replace(c, attention_heads=heads)
    return prof
