"""Offline tokenizers: word-level stand-ins for CLIPTokenizer and T5TokenizerFast.

Random-init pipelines (tiny tests, full-size meta profiles, GPU benchmarks) need tokenizers that
produce ids of the right shapes, never the real vocabularies: these are built from a small word
list with the `tokenizers` library, so nothing is downloaded.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# A small vocabulary that covers typical test prompts; anything else maps to the unknown token.
WORDS = ("a an the of and with in on at to for from by is are photo picture painting image portrait "
         "cat dog bird fish horse astronaut robot man woman child city forest mountain river sea sky "
         "house car tree flower sun moon star night day red green blue yellow black white orange purple "
         "big small old young beautiful detailed high quality sharp focus style art digital oil "
         "riding sitting standing running flying holding wearing hat glasses coffee cup table window "
         "light dark shadow cinematic lighting 4k 8k render scene landscape closeup view , . ! ?").split()


def _build(specials: list[str], template: str, pair: str, max_length: int, **special_tokens) -> "PreTrainedTokenizerFast":
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in WORDS if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special_tokens["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ids = [(s, vocab[s]) for s in specials if s in template or s in pair]
    tok.post_processor = processors.TemplateProcessing(single=template, pair=pair, special_tokens=ids)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, padding_side="right",
                                   **special_tokens)


def clip_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>") -> "PreTrainedTokenizerFast":
    """Behaves as CLIPTokenizer: <|startoftext|> words <|endoftext|>, padded to 77.

    The end token has the largest id, like CLIP's 49407, so a CLIP text model's pooling (which
    takes the argmax id when eos_token_id == 2, or the first eos_token_id otherwise) finds it.
    `pad_token="!"` mimics SD3's CLIP-G tokenizer, which pads with id 0.
    """
    specials = ["!", "<|unk|>", "<|startoftext|>"]
    words = [w for w in WORDS if w != "!"]
    vocab_order = specials + words + ["<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(vocab_order)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, padding_side="right",
                                   bos_token=bos, eos_token=eos, unk_token="<|unk|>", pad_token=pad_token)


def t5_tokenizer(max_length: int = 512) -> "PreTrainedTokenizerFast":
    """Behaves as T5TokenizerFast: words </s>, pad id 0, eos id 1, unk id 2."""
    return _build(["<pad>", "</s>", "<unk>"], "$A </s>", "$A </s> $B </s>", max_length,
                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
