"""The tiny LexVLA the LexVLA tests build: a word-level Llama saved as a folder, a random DINOv2
configuration, and images."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sae_training.lexvla.config import LexVLAConfig

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ["a", "the", "red", "blue", "green", "star", "ring", "square", "and", "image", "shows",
         ".", ",", "there", "is", "of"]


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``SPECIAL`` + ``words``."""
    vocab = {w: i for i, w in enumerate(SPECIAL + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def save_text_model(folder: Path) -> Path:
    """A tiny random Llama over ``WORDS`` (its LM head tied to its embeddings), saved with its
    tokenizer into ``folder``."""
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64,
                                      intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=64, tie_word_embeddings=True,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2))
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_config(text_model, **overrides) -> LexVLAConfig:
    """A LexVLA over ``text_model`` with a tiny random DINOv2 trained along (32 px images)."""
    settings = dict(text_model=str(text_model), prompt="{caption} the image shows",
                    backbone_config=dict(image_size=32, patch_size=8, hidden_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2),
                    freeze_backbone=False, image_size=32, pixel_mean=(0.5,) * 3,
                    pixel_std=(0.5,) * 3, adapter_heads=2, adapter_hidden=32, lora_r=4,
                    lora_alpha=8)
    return LexVLAConfig(**{**settings, **overrides})


def images(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random pixel tensors in [-1, 1], 32 px."""
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
