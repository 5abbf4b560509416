"""The embedded pipeline's networks: a Flux-shaped denoiser and a small, convolution-free VAE.

Both are made of Linear layers whose sides are multiples of 64 (wherever the shapes allow), so that
int8 / fp8 / nf4 quantizers act on them; forward paths use the layers as modules and never read a
Linear's `.weight`, so swapped-in quantized layers work. No convolutions: bf16 convolutions are
~40x slower than fp32 ones on CPUs without native bf16, while bf16 Linears are only ~5x slower.

Latents are (B, 4, 8, 8) for a 64x64 image; the pipeline packs them 2x2 into 16 tokens of 16 features,
as Flux packs its 16-channel latents.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4), as Flux's _pack_latents."""
    B, C, H, W = latents.shape
    x = latents.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, C*4) -> (B, C, h, w)."""
    B, N, D = tokens.shape
    x = tokens.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, h, w)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1000] (computed in fp32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class SingleStreamBlock(nn.Module):
    """Flux's single-stream block: text and image tokens in one sequence, attention and MLP in
    parallel, both read from one adaptive LayerNorm and written back through one output Linear."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mod = nn.Linear(dim, 3 * dim)  # shift, scale, gate from the conditioning vector
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.mlp_in = nn.Linear(dim, mlp_ratio * dim)
        self.to_out = nn.Linear(dim + mlp_ratio * dim, dim)
        self.norm_q = nn.RMSNorm(dim // heads, eps=1e-6)  # QK-norm keeps attention logits tame in bf16
        self.norm_k = nn.RMSNorm(dim // heads, eps=1e-6)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, N, D = x.shape
        shift, scale, gate = self.mod(F.silu(vec)).unsqueeze(1).chunk(3, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        q, k, v = self.to_qkv(h).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(self.norm_q(q), self.norm_k(k), v, attn_mask=mask)
        a = a.transpose(1, 2).reshape(B, N, D)
        m = F.gelu(self.mlp_in(h), approximate="tanh")
        return x + gate * self.to_out(torch.cat([a, m], dim=-1))


class EmbeddedTransformer(ModelMixin, ConfigMixin):
    """Rectified-flow denoiser: predicts the velocity (noise - data) of packed latent tokens, given
    MiniLM token embeddings (joint attention), their pooled mean and the timestep (adaptive norms)."""

    _repeated_blocks = ["SingleStreamBlock"]
    _no_split_modules = ["SingleStreamBlock"]

    @register_to_config
    def __init__(self, in_channels: int = 16, num_image_tokens: int = 16, dim: int = 128, num_layers: int = 4,
                 num_heads: int = 2, mlp_ratio: int = 2, text_dim: int = 384, time_dim: int = 256):
        super().__init__()
        self.x_embedder = nn.Linear(in_channels, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, num_image_tokens, dim) * 0.02)
        self.context_embedder = nn.Linear(text_dim, dim)
        self.time_in = nn.Sequential(nn.Linear(time_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text_in = nn.Sequential(nn.Linear(text_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(SingleStreamBlock(dim, num_heads, mlp_ratio) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mod_out = nn.Linear(dim, 2 * dim)
        self.proj_out = nn.Linear(dim, in_channels)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.pos_embed.dtype  # a plain Parameter: quantizers replace only Linear weights

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                pooled_projections: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                return_dict: bool = True):
        """hidden_states (B, N, in_channels); encoder_hidden_states (B, T, text_dim); timestep (B,) sigma in [0, 1];
        pooled_projections (B, text_dim), default the (masked) mean of the text tokens; mask (B, T), 1 = real token."""
        dt = self.compute_dtype
        txt = encoder_hidden_states.to(dt)
        B, T, _ = txt.shape
        if encoder_attention_mask is None:
            encoder_attention_mask = torch.ones(B, T, dtype=torch.bool, device=txt.device)
        tmask = encoder_attention_mask.bool()
        if pooled_projections is None:
            w = tmask.to(dt).unsqueeze(-1)
            pooled_projections = (txt * w).sum(1) / w.sum(1).clamp(min=1)
        vec = self.time_in(timestep_embedding(timestep * 1000, self.config.time_dim).to(dt)) + \
            self.text_in(pooled_projections.to(dt))
        x = torch.cat([self.context_embedder(txt), self.x_embedder(hidden_states.to(dt)) + self.pos_embed], dim=1)
        # keys: padded text tokens are hidden; every image token is visible
        keep = torch.cat([tmask, torch.ones(B, x.shape[1] - T, dtype=torch.bool, device=x.device)], dim=1)
        mask = None if bool(keep.all()) else keep[:, None, None, :]
        for block in self.blocks:
            x = block(x, vec, mask)
        shift, scale = self.mod_out(F.silu(vec)).unsqueeze(1).chunk(2, dim=-1)
        out = self.proj_out(self.norm_out(x[:, T:]) * (1 + scale) + shift)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class Block(nn.Module):
    """Plain pre-norm transformer block (the VAE's)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp_in = nn.Linear(dim, mlp_ratio * dim)
        self.mlp_out = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.to_qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.norm2(x)), approximate="tanh"))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp_in = nn.Linear(dim, mlp_ratio * dim)
        self.mlp_out = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x):
        return x + self.mlp_out(F.gelu(self.mlp_in(self.norm(x)), approximate="tanh"))


@dataclass
class DecoderOutput:
    sample: torch.Tensor


class EmbeddedVAE(ModelMixin, ConfigMixin):
    """A small KL autoencoder, 64x64x3 <-> 4x8x8, made of Linears.

    Encoder: 16x16 pixel patches -> transformer over the 4x4 patch grid -> mean/logvar of 2x2x4 latents.
    Decoder: packed latents -> transformer over 4x4 tokens -> each token split in four (8x8 grid)
    -> per-token MLP -> 8x8 pixel patches. Output in [-1, 1] as diffusers' VAEs.
    """

    @register_to_config
    def __init__(self, image_size: int = 64, latent_channels: int = 4, dim: int = 128, num_heads: int = 2,
                 enc_layers: int = 2, dec_layers: int = 2, scaling_factor: float = 1.0, shift_factor: float = 0.0):
        super().__init__()
        g = image_size // 16  # coarse token grid side
        self.enc_in = nn.Linear(16 * 16 * 3, dim)
        self.enc_pos = nn.Parameter(torch.randn(1, g * g, dim) * 0.02)
        self.enc_blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(enc_layers))
        self.enc_norm = nn.LayerNorm(dim)
        self.enc_out = nn.Linear(dim, 2 * 4 * latent_channels)
        self.dec_in = nn.Linear(4 * latent_channels, dim)
        self.dec_pos = nn.Parameter(torch.randn(1, g * g, dim) * 0.02)
        self.dec_blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(dec_layers))
        self.dec_up = nn.Linear(dim, 4 * dim)
        self.dec_pos2 = nn.Parameter(torch.randn(1, 4 * g * g, dim) * 0.02)
        self.dec_refine = MLPBlock(dim)
        self.dec_norm = nn.LayerNorm(dim)
        self.dec_out = nn.Linear(dim, 8 * 8 * 3)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.dec_pos.dtype

    def encode(self, images: torch.Tensor):
        """images (B, 3, S, S) in [-1, 1] -> (mean, logvar), each (B, C, S/8, S/8)."""
        B, _, S, _ = images.shape
        g = S // 16
        p = images.to(self.compute_dtype).view(B, 3, g, 16, g, 16).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, -1)
        x = self.enc_in(p) + self.enc_pos
        for blk in self.enc_blocks:
            x = blk(x)
        mean, logvar = self.enc_out(self.enc_norm(x)).chunk(2, dim=-1)
        return unpack(mean, 2 * g, 2 * g), unpack(logvar.clamp(-20, 10), 2 * g, 2 * g)

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        """latents (B, C, S/8, S/8), unscaled -> images (B, 3, S, S) in about [-1, 1]."""
        B, C, h, w = latents.shape
        g = h // 2
        x = self.dec_in(pack(latents.to(self.compute_dtype))) + self.dec_pos
        for blk in self.dec_blocks:
            x = blk(x)
        # split each coarse token into its 2x2 children (pixel shuffle on tokens)
        D = x.shape[-1]
        x = self.dec_up(x).view(B, g, g, 2, 2, D).permute(0, 1, 3, 2, 4, 5).reshape(B, 4 * g * g, D)
        x = self.dec_refine(x + self.dec_pos2)
        p = self.dec_out(self.dec_norm(x))  # (B, (2g)^2, 8*8*3)
        G = 2 * g
        img = p.view(B, G, G, 3, 8, 8).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, 8 * G, 8 * G)
        return DecoderOutput(sample=img) if return_dict else (img,)

    def forward(self, images: torch.Tensor, sample: bool = True):
        """Reconstruction (training): returns (reconstruction, mean, logvar)."""
        mean, logvar = self.encode(images)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if sample else mean
        return self.decode(z).sample, mean, logvar
