"""Small concept spaces built from scratch with a fixed seed: an 8-wide VL-SAE space with its
config, a space for the tiny CLIP's embeddings, a LexVLA space whose words map onto chosen token
ids of the tiny LLaVA, and the tiny LLaVA's random space with word and phrase readouts (evidence
mode), a random word readout over four of its tokens, and a patch readout over tokens it writes
(grounding mode); and for each steering mode, options that steer the tiny LLaVA visibly and a
space to steer it with (``STEERING``, ``steering_spaces``)."""

from __future__ import annotations

import math

import torch
from torch import nn

from vlsae_hooks import VLSAE, AuxAligner, PatchReadout, SpaceConfig, VLSAESpace
from vlsae_hooks.phrase_evidence import PhraseReadout
from vlsae_hooks.spaces.lexvla import LexVLASpace
from vlsae_hooks.testing import random_space
from vlsae_hooks.word_evidence import WordReadout


def space_config(**overrides) -> SpaceConfig:
    values = dict(kind="vlsae", d_model=8, n_concepts=32, k=4, model_name="vlsae-toy/llava",
                  model_type="llava", site="layer_input", layer=2, has_aligner=True)
    values.update(overrides)
    return SpaceConfig(**values)


def small_space(has_aligner: bool = True, seed: int = 0) -> VLSAESpace:
    """An untrained 8-wide VL-SAE space (32 concepts, k 4), with an aligner unless told not."""
    torch.manual_seed(seed)
    config = space_config(has_aligner=has_aligner)
    sae = VLSAE(config.d_model, config.n_concepts, config.k)
    aligner = AuxAligner(config.d_model) if has_aligner else None
    return VLSAESpace(sae, aligner, config)


def clip_space(llava: nn.Module, n_concepts: int = 256, k: int = 8,
               aligner: bool = False) -> VLSAESpace:
    """A random space for the tiny CLIP's projected embeddings (64-d, as wide as ``llava``, the
    tiny LLaVA it is drawn for): 256 concepts, k 8, no aligner unless told otherwise."""
    space = random_space(llava, n_concepts=n_concepts, k=k, aligner=aligner, site="layer_input")
    space.config.site, space.config.layer, space.config.model_type = "clip_embeds", None, "clip"
    return space


def lexvla_space(token_ids: list[int]) -> LexVLASpace:
    """A tiny random LexVLA space whose three words map onto ``token_ids`` of the VLM."""
    torch.manual_seed(3)
    config = SpaceConfig(
        kind="lexvla", d_model=16, n_concepts=3, k=3, model_name="tiny", model_type="llava",
        site="pixel_values", layer=None, has_aligner=False, source="lexvla",
        extra={"backbone": dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, mlp_ratio=2),
               "adapter": {"n_heads": 2, "d_hidden": 16}, "vocabulary": ["red", "blue", "star"],
               "vlm_token_ids": token_ids, "image_size": 32, "pixel_mean": [0.5] * 3,
               "pixel_std": [0.5] * 3, "vlm_pixel_mean": [0.48, 0.46, 0.41],
               "vlm_pixel_std": [0.27, 0.26, 0.28]})
    space = LexVLASpace(config)
    nn.init.normal_(space.vision_codebook)
    return space.eval()


WORD_TOKENS = torch.tensor([11, 4, 17, 30])
"""The tiny LLaVA's token ids ``word_readout`` reads words into."""


def word_readout(n_concepts: int, seed: int = 0) -> WordReadout:
    """A random word readout over ``WORD_TOKENS`` (weights 3 N(0, 1), biases N(0, 1) - 2,
    priors 0.3) for a space of ``n_concepts``."""
    g = torch.Generator().manual_seed(seed)
    return WordReadout(3 * torch.randn(n_concepts, len(WORD_TOKENS), generator=g),
                       torch.randn(len(WORD_TOKENS), generator=g) - 2, WORD_TOKENS,
                       torch.full((len(WORD_TOKENS),), math.log(0.3)))


def space_with_readouts(model: nn.Module, layer: int = 2) -> VLSAESpace:
    """A random space of ``model`` (64 concepts, k 4) at the input of decoder ``layer``, with a
    max-pooled word readout and a phrase readout over tokens the tiny LLaVA emits (seed 0)."""
    space = random_space(model, layer=layer, n_concepts=64, k=4)
    g = torch.Generator().manual_seed(0)
    space.word_readout = WordReadout(3 * torch.randn(64, 12, generator=g),
                                     torch.randn(12, generator=g) - 1, torch.arange(5, 17),
                                     torch.full((12,), math.log(0.3)), pool="max")
    space.phrase_readout = PhraseReadout(3 * torch.randn(64, 10, generator=g),
                                         torch.randn(10, generator=g) - 1, torch.arange(8, 18),
                                         torch.full((10,), math.log(0.2)),
                                         torch.tensor([5, 6, 7, 5, 6, 7, 9, 10, 11, 12]))
    return space


UNITS = torch.tensor([[53, 11], [121, -1], [67, 21], [35, -1]])
"""A patch readout's units: attributes 0 (tokens 53, 11) and 1 (121); objects 0 (67, 21) and 1
(35): tokens the tiny LLaVA writes when greedy, so that steering has answers to change."""
IS_ATTRIBUTE = torch.tensor([True, True, False, False])


def patch_readout(d: int = 64, seed: int = 0, layer: int = 0, **changes) -> PatchReadout:
    """A random patch readout over ``UNITS`` for states of width ``d`` (the tiny LLaVA's 64);
    ``changes`` replace its tensors."""
    g = torch.Generator().manual_seed(seed)
    fields = {"weight": 0.5 * torch.randn(d, 4, generator=g),
              "bias": torch.tensor([-1.0, 0.5, -0.5, -2.0]),
              "mean": 0.1 * torch.randn(d, generator=g), "std": 0.5 + torch.rand(d, generator=g),
              "unit_token_ids": UNITS, "is_attribute": IS_ATTRIBUTE, **changes}
    return PatchReadout(**fields, layer=layer)


def space_with_patch_readout(model: nn.Module) -> VLSAESpace:
    """A random space of ``model`` (64 concepts, k 4) at the input of decoder layer 2 with
    ``patch_readout()`` beside it (grounding mode)."""
    space = random_space(model, layer=2, n_concepts=64, k=4)
    space.patch_readout = patch_readout()
    return space


STEERING = {"shift": dict(mode="shift", alpha=2.0), "contrast": dict(mode="contrast", alpha=2.0),
            "evidence": dict(mode="evidence", strength=4.0),
            "grounding": dict(mode="grounding", strength=6.0), "lexical": dict(strength=8.0)}
"""Every steering mode's ``attach`` options, strong enough to change the tiny LLaVA's tokens."""


def steering_spaces(model: nn.Module) -> dict[str, VLSAESpace | LexVLASpace]:
    """The space each mode of ``STEERING`` steers ``model`` with."""
    readouts = space_with_readouts(model)
    return {"shift": readouts, "contrast": readouts, "evidence": readouts,
            "grounding": space_with_patch_readout(model),
            "lexical": lexvla_space([53, 121, 35])}
