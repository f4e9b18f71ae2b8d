"""The models and spaces ``decode_overhead.py`` times its methods on (``decode_methods.py``):
the shipped toy LLaVA and its space (or a random tiny LLaVA), LLaVA-1.5-7B's geometry, readouts
of the right shapes, and the prompt; and the ``--json`` / ``--toy-model`` arguments every
toy-timing benchmark takes (``toy_parser``).

Models (torch and transformers only) and spaces (``vlsae_hooks``) are built apart, so that
``decode_overhead.py --baseline-src`` can build a model once and hand it to two source trees,
each building its own space with its own ``vlsae_hooks``.

The 7B geometry model is LLaVA-1.5-7B's shape (Llama 32 x 4096, CLIP ViT-L/14-336, 576 image
tokens) with random bf16 weights, and a VL-SAE of h = 32768, k = 256 with an aligner, stored
bf16, trained-at-layer 30 of 32 as the reference's (steered one layer later), with a random word
readout over 4,096 tokens and a random phrase readout over 4,096 phrases for evidence mode (as
the toy space recommends, with phrases: prefill encodes all 576 image positions and takes every
concept's score at each; a step compares the last token with the phrases' first tokens).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from vlsae_hooks import find_space, load_space
from vlsae_hooks.phrase_evidence import PhraseReadout
from vlsae_hooks.registry import SPACE_SUBFOLDER
from vlsae_hooks.spaces import VLSAE, AuxAligner, ConceptSpace, SpaceConfig, VLSAESpace
from vlsae_hooks.testing import random_space, tiny_llava
from vlsae_hooks.word_evidence import WordReadout


def random_readout(n_concepts: int, n_tokens: int, dtype: torch.dtype) -> WordReadout:
    """A word readout of the right shape (its values do not change the cost), max-pooled like
    the shipped toy readout: every image position is encoded at prefill."""
    g = torch.Generator().manual_seed(0)
    return WordReadout(torch.randn(n_concepts, n_tokens, generator=g).to(dtype),
                       torch.zeros(n_tokens, dtype=dtype), torch.arange(5, 5 + n_tokens),
                       torch.full((n_tokens,), -3.0), pool="max")


def random_patch_readout(d_model: int, vocab_size: int, dtype: torch.dtype):
    """A patch readout at layer 0 of COCO's size (80 object units, 11 colour units, two
    spellings each; fewer where the vocabulary is small): its values do not change the cost.
    Imported here so that ``--baseline-src`` trees older than mode grounding still load."""
    from vlsae_hooks.patch_readout import PatchReadout

    g = torch.Generator().manual_seed(2)
    m = min(91, (vocab_size - 5) // 2)
    n_objects = m * 80 // 91
    return PatchReadout(torch.randn(d_model, m, generator=g).to(dtype),
                        torch.zeros(m, dtype=dtype), torch.zeros(d_model, dtype=dtype),
                        torch.ones(d_model, dtype=dtype), torch.arange(5, 5 + 2 * m).view(m, 2),
                        torch.arange(m) >= n_objects, layer=0)


def random_phrases(n_concepts: int, n_phrases: int, dtype: torch.dtype) -> PhraseReadout:
    """A phrase readout of the right shape, over the max-pooled dense concept scores."""
    g = torch.Generator().manual_seed(1)
    return PhraseReadout(torch.randn(n_concepts, n_phrases, generator=g).to(dtype),
                         torch.zeros(n_phrases, dtype=dtype), 5 + torch.arange(n_phrases),
                         torch.full((n_phrases,), -3.0), torch.full((n_phrases,), 5))


def default_toy_model() -> str | None:
    """The shipped toy LLaVA (the benchmark lives beside eval_suites, which ships it), or None
    (a random tiny LLaVA, ``toy_model``) where a checkout lacks the toy assets."""
    from eval_suites.toyworld.assets_paths import toy_paths

    try:
        return str(toy_paths().llava)
    except FileNotFoundError:
        return None


def toy_parser(doc: str) -> argparse.ArgumentParser:
    """A toy-timing benchmark's parser (described by its ``doc``'s first paragraph) with the two
    arguments they all take: ``--json`` and ``--toy-model``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--json", required=True, type=Path, help="where to write the results")
    parser.add_argument("--toy-model", default=default_toy_model(),
                        help="toy LLaVA folder with its space (default: the shipped toy, else "
                             "a random tiny LLaVA)")
    return parser


def with_readouts(space: ConceptSpace) -> ConceptSpace:
    """``space`` with random word and phrase readouts (32 each) where it has none."""
    if space.word_readout is None:
        space.word_readout = random_readout(space.config.n_concepts, 32, torch.float32)
    if space.phrase_readout is None:
        space.phrase_readout = random_phrases(space.config.n_concepts, 32, torch.float32)
    return space


def toy_model(path: str | None, device: str = "cpu") -> nn.Module:
    """The toy LLaVA at ``path``, or (None) a random tiny LLaVA, on ``device``."""
    if path is None:
        return tiny_llava().to(device)
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path).to(device).eval()


def toy_space(model: nn.Module, path: str | None) -> tuple[ConceptSpace, str]:
    """The space of the toy LLaVA at ``path`` (the ``vlsae_space`` folder beside it, else the
    one registered for ``model``, else a random one), with readouts, and what it is in words.
    ``model`` is that LLaVA or one with the same weights (side by side, each tree reads the
    space and its recommended steering from its own toy assets)."""
    if path is None:
        return with_readouts(random_space(model, layer=2)), "random tiny LLaVA (no toy assets)"
    beside = Path(path) / SPACE_SUBFOLDER
    found = beside if beside.is_dir() else find_space(model)
    space = load_space(found) if found else random_space(model, layer=len(
        model.model.language_model.layers) // 2)
    return with_readouts(space), f"{path} ({'its space' if found else 'random space'})"


def load_toy(path: str | None, device: str = "cpu"):
    """(model, space, description): the shipped toy LLaVA and its space, or a random tiny LLaVA
    with a random space, on ``device``."""
    model = toy_model(path, device)
    space, description = toy_space(model, path)
    return model, space.to(device), description


def llava_7b_model(n_layers: int, vision_layers: int, device: str = "cpu") -> nn.Module:
    """LLaVA-1.5-7B's shapes with random bf16 weights (plain init, no meta device), built on
    ``device`` (initialised there: a GPU draws 7B random weights in seconds)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                       num_hidden_layers=vision_layers, num_attention_heads=16,
                                       image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                num_hidden_layers=n_layers, num_attention_heads=32,
                                num_key_value_heads=32, vocab_size=32064,
                                max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0),
        image_token_index=32000, image_seq_length=576, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = 0
    return model


def train_layer(n_layers: int) -> int:
    """Where the 7B geometry's space was trained: layer 30 of 32, scaled (it steers one later)."""
    return max(0, min(n_layers - 2, round(30 * n_layers / 32)))


def llava_7b_space(n_layers: int) -> ConceptSpace:
    """The reference-size VL-SAE space for ``llava_7b_model(n_layers, ...)``, with readouts over
    4,096 tokens and 4,096 phrases, recommending evidence mode with phrases (seeded: the same
    weights wherever it is built)."""
    torch.manual_seed(1)
    space_config = SpaceConfig(kind="vlsae", d_model=4096, n_concepts=32768, k=256,
                               model_name="llava-hf/llava-1.5-7b-hf", model_type="llava",
                               site="layer_input", layer=train_layer(n_layers), has_aligner=True,
                               source="reference")
    space = VLSAESpace(VLSAE(4096, 32768, 256), AuxAligner(4096), space_config)
    space.word_readout = random_readout(32768, 4096, torch.bfloat16)
    space.phrase_readout = random_phrases(32768, 4096, torch.bfloat16)
    space.patch_readout = random_patch_readout(4096, 32064, torch.bfloat16)
    space.recommended_steering = {"mode": "evidence", "phrase_strength": 1.0}
    return space.to(torch.bfloat16).eval()


def llava_7b_geometry(n_layers: int, vision_layers: int, device: str = "cpu"):
    """(model, space) of LLaVA-1.5-7B's shapes (``llava_7b_model``, ``llava_7b_space``) on
    ``device``."""
    return (llava_7b_model(n_layers, vision_layers, device),
            llava_7b_space(n_layers).to(device))


def prompt_inputs(model, n_text: int = 24) -> dict:
    """One image prompt, LLaVA style: ``<s> <image>*n text``, with a random image, on the
    model's device."""
    config = model.config
    vision = config.vision_config
    torch.manual_seed(0)
    vocab = config.text_config.vocab_size
    text = torch.randint(5, vocab, (n_text,))  # ids 0-4: pad / bos / eos / unk-like specials
    text[text == config.image_token_id] = 5
    image = torch.full((config.image_seq_length,), config.image_token_id)
    ids = torch.cat([torch.tensor([1]), image, text])[None]
    weight = next(model.parameters())
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size, dtype=weight.dtype)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)
    return {name: value.to(weight.device) for name, value in inputs.items()}
