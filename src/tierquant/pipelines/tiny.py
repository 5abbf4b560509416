"""Tiny random-init pipelines of the real classes, for tests on CPU.

Every Linear of the transformers and of T5 has both sides >= 64 (= components.MIN_FEATURES), so
the quantizers act on them as on the full-size models (NF4 blocks of 64 divide them).
Building runs under a fixed seed: the same seed gives identical weights.
"""
from __future__ import annotations

import torch

from .tokenizers import clip_tokenizer, t5_tokenizer

HIDDEN = 64  # transformer width: 4 heads of 16
TEXT = 64  # CLIP width; T5 width is 64 for Flux, 128 for SD3 (it must hold both CLIPs side by side)
VOCAB = 128  # > the offline tokenizers' vocabularies (~100 ids)
PROMPT = "a photo of a cat"


def _clip(projection: bool, hidden: int = TEXT):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = clip_tokenizer()
    cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=hidden,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                         hidden_act="gelu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg), tok


def _t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=VOCAB, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2, num_heads=d_model // 16,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                   use_cache=False, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg), t5_tokenizer()


def _vae(scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    # Four levels as in the real VAEs: 8x downsampling, so 64x64 images give 8x8 latents.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 16, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=8, sample_size=64, use_quant_conv=False,
                         use_post_quant_conv=False, scaling_factor=scaling_factor, shift_factor=shift_factor)


def _scheduler(dynamic: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dynamic:
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def _finish(pipe, dtype):
    # Modules built from a config start in training mode (dropout on); from_pretrained would eval().
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A FluxPipeline (CLIP-L + T5 + Flux transformer with guidance embedding + 16-channel VAE) at toy size."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip, tok = _clip(projection=False)
        t5, tok2 = _t5(HIDDEN)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                             attention_head_dim=16, num_attention_heads=HIDDEN // 16,
                                             joint_attention_dim=t5.config.d_model, pooled_projection_dim=TEXT,
                                             guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        vae = _vae(0.3611, 0.1159)
    pipe = FluxPipeline(scheduler=_scheduler(dynamic=True), vae=vae, text_encoder=clip, tokenizer=tok,
                        text_encoder_2=t5, tokenizer_2=tok2, transformer=transformer)
    return _finish(pipe, dtype)


def tiny_sd3(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A StableDiffusion3Pipeline (CLIP-L + CLIP-G with projection, T5, SD3 transformer, VAE) at toy size."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip_l, tok = _clip(projection=True)
        clip_g, tok2 = _clip(projection=True)
        tok2 = clip_tokenizer(pad_token="!")  # SD3's CLIP-G tokenizer pads with "!" (id 0)
        # SD3 pads the CLIP embeddings (side by side) up to T5's width: T5 must be >= the sum.
        t5, tok3 = _t5(2 * TEXT)
        transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2,
                                            attention_head_dim=16, num_attention_heads=HIDDEN // 16,
                                            joint_attention_dim=t5.config.d_model, caption_projection_dim=HIDDEN,
                                            pooled_projection_dim=2 * TEXT, out_channels=16, pos_embed_max_size=16,
                                            qk_norm="rms_norm")
        vae = _vae(1.5305, 0.0609)
    pipe = StableDiffusion3Pipeline(scheduler=_scheduler(dynamic=False), vae=vae, text_encoder=clip_l, tokenizer=tok,
                                    text_encoder_2=clip_g, tokenizer_2=tok2, text_encoder_3=t5, tokenizer_3=tok3,
                                    transformer=transformer)
    return _finish(pipe, dtype)


def _call(seed: int, overrides: dict, **defaults) -> dict:
    kwargs = dict(prompt=PROMPT, height=64, width=64, num_inference_steps=2, output_type="np", **defaults)
    kwargs.update(overrides)
    if "generator" not in overrides:
        kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
    return kwargs


def tiny_flux_call(seed: int = 0, **overrides) -> dict:
    """Call kwargs for `tiny_flux()`: one 64x64 image in 2 steps, short T5 sequence."""
    return _call(seed, overrides, guidance_scale=3.5, max_sequence_length=32)


def tiny_sd3_call(seed: int = 0, **overrides) -> dict:
    """Call kwargs for `tiny_sd3()`: one 64x64 image in 2 steps with classifier-free guidance."""
    return _call(seed, overrides, guidance_scale=5.0, max_sequence_length=32)
