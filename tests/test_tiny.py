"""The tiny pipelines and offline tokenizers the other tests build on."""
import numpy as np
import torch

from tierquant import components
from tierquant.pipelines.tokenizers import clip_tokenizer, t5_tokenizer
from tierquant.pipelines.tiny import tiny_flux, tiny_flux_call


def test_tokenizers_pad_and_truncate_like_clip_and_t5():
    clip = clip_tokenizer()
    ids = clip(["a photo of a cat"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    assert ids[0, 0] == clip.bos_token_id and ids[0, 6] == clip.eos_token_id
    assert ids[0].argmax() == 6  # CLIP pools at the argmax id: the end token must be the largest
    t5 = t5_tokenizer()
    ids = t5(["a cat " * 20], padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (1, 16) and ids[0, -1] == t5.eos_token_id == 1 and t5.pad_token_id == 0
    assert t5.batch_decode(ids[:, :2]) == ["a cat"]


def test_tiny_flux_is_deterministic_and_quantizable(tiny_flux_pipe, tiny_flux_kwargs):
    image = tiny_flux_pipe(**tiny_flux_kwargs).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    again = tiny_flux(seed=0)(**tiny_flux_call(seed=0)).images
    assert np.array_equal(image, again)
    # Every transformer Linear is big enough for the quantizers (nothing kept for size).
    layers = components.quantizable_layers(tiny_flux_pipe.transformer)
    assert layers and all(keep is None for _, _, keep in layers)
    other = tiny_flux(seed=1)
    assert not torch.equal(next(other.transformer.parameters()), next(tiny_flux_pipe.transformer.parameters()))


def test_tiny_sd3_generates_with_cfg(tiny_sd3_pipe, tiny_sd3_kwargs):
    assert tiny_sd3_kwargs["guidance_scale"] > 1
    image = tiny_sd3_pipe(**tiny_sd3_kwargs).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    assert all(keep is None for _, _, keep in components.quantizable_layers(tiny_sd3_pipe.transformer))
