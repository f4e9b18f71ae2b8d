"""The LexVLA concept space at exact values: encode (elu + 1, max over patches for vision, the
text codebook for text, the 1/sqrt(V) cut keeping an entry at it), decode against each
modality's codebook in the caller's dtype, the VLM's pixel values read back, and its words
mapped onto a VLM tokenizer (``helpers.spaces.lexvla_space``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers.lexvla import word_tokenizer
from helpers.spaces import lexvla_space

from vlsae_hooks.spaces.lexvla import UNMAPPED, LexVLASpace, drop_below, map_vocabulary


def codebook_space() -> LexVLASpace:
    """The 3-word space with one-hot codebooks on 16 dims: vision word j reads dim j, text word
    j reads dim j + 3."""
    space = lexvla_space([10, 20, 30])
    with torch.no_grad():
        space.vision_codebook.copy_(torch.eye(16)[:3])
        space.text_codebook.copy_(torch.eye(16)[3:6])
    return space


def test_encode_pools_vision_patches_by_max_and_reads_text_with_the_text_codebook():
    space = codebook_space()
    patches = torch.zeros(1, 2, 16)
    patches[0, 0, :3] = torch.tensor([2.0, 0.0, -50.0])
    patches[0, 1, :3] = torch.tensor([0.0, 1.0, -50.0])
    weights = torch.tensor([3.0, 2.0, 0.0])  # max over patches of elu + 1
    assert torch.allclose(space.encode_dense(patches, "vision", sparse=False)[0],
                          weights / weights.norm(), atol=1e-6)
    text = torch.zeros(16)
    text[3:6] = torch.tensor([0.0, 2.0, 0.0])  # text word j reads dim j + 3 only
    assert torch.allclose(space.encode_dense(text, "text", sparse=False),
                          torch.tensor([1.0, 3.0, 1.0]) / math.sqrt(11), atol=1e-6)
    with pytest.raises(ValueError):
        space.encode(text, "audio")


def test_the_sparse_cut_keeps_an_entry_at_one_over_sqrt_v():
    assert torch.equal(drop_below(torch.tensor([0.5, 0.25, 0.2]), 0.25),
                       torch.tensor([0.5, 0.25, 0.0]))
    space = codebook_space()
    even = torch.zeros(16)  # every word the same weight: each exactly 1/sqrt(3)
    sparse = space.encode(even, "text")
    assert torch.allclose(sparse, torch.full((3,), 1 / math.sqrt(3))) and (sparse > 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_decode_uses_each_modalitys_codebook_in_the_callers_dtype(dtype):
    space = codebook_space()
    z = torch.tensor([[1.0, 0.0, 2.0]], dtype=dtype)
    vision, text = space.decode(z, "vision"), space.decode(z, "text")
    assert vision.dtype == text.dtype == dtype
    assert vision[0, :6].tolist() == [1.0, 0.0, 2.0, 0.0, 0.0, 0.0]
    assert text[0, :6].tolist() == [0.0, 0.0, 0.0, 1.0, 0.0, 2.0]


def test_vlm_pixels_are_read_back_clamped_and_patch_features_drop_cls():
    space = lexvla_space([10, 20, 30])
    space.config.extra["pixel_mean"], space.config.extra["pixel_std"] = [0.25] * 3, [0.5] * 3
    mean = torch.tensor([0.48, 0.46, 0.41])[:, None, None]
    std = torch.tensor([0.27, 0.26, 0.28])[:, None, None]
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    image[0, 0, 0, 0], image[0, 1, 0, 0] = 5.0, -5.0  # outside [0, 1]: clamped
    ours = space.from_vlm_pixels((image - mean) / std)
    expected = (image.clamp(0, 1) - 0.25) / 0.5  # this space's own normalisation
    assert torch.allclose(ours, expected, atol=1e-5)
    assert space.patch_features(ours).shape == (1, 16, 16)  # 4 x 4 patches, no CLS token


def test_words_map_onto_a_vlm_tokenizer_preferring_word_starts():
    vlm = word_tokenizer(["ring", "\u2581ring", "star", "\u2581"])
    vocab = vlm.get_vocab()
    assert map_vocabulary(["\u0120ring", "star", "\u0120", "\u2581<pad>"], vlm) == [
        vocab["\u2581ring"], vocab["star"], UNMAPPED, UNMAPPED]
    space = lexvla_space([10, 20, 30])
    assert space.set_vlm_vocabulary(word_tokenizer(["star", "red"]), "other") == 2
    assert space.vlm_token_ids.tolist()[1] == UNMAPPED and space.config.model_name == "other"
    config = lexvla_space([10, 20, 30]).config
    config.extra["vlm_token_ids"] = [10.0, 20.0, 30.0]
    with pytest.raises(ValueError, match="one integer VLM token id"):
        LexVLASpace(config)


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c, "kind", "vlsae"), "needs config.kind 'lexvla', got 'vlsae'"),
    (lambda c: c.extra.pop("adapter"), r"lacks extra fields \['adapter'\]"),
    (lambda c: setattr(c, "n_concepts", 4), "lists 3 words for n_concepts=4"),
    (lambda c: c.extra.update(vlm_token_ids=[10, 20]), "one integer VLM token id"),
])
def test_a_config_that_does_not_describe_a_lexvla_space_is_refused(change, message):
    config = copy.deepcopy(lexvla_space([10, 20, 30]).config)
    change(config)
    with pytest.raises(ValueError, match=message):
        LexVLASpace(config)


def test_pixels_of_another_size_are_resized_to_the_models_input():
    space = lexvla_space([10, 20, 30])
    space.config.extra["pixel_mean"], space.config.extra["pixel_std"] = [0.25] * 3, [0.5] * 3
    grey = space.normalize_pixels(torch.full((1, 3, 64, 64), 0.75))
    assert torch.allclose(grey, torch.ones(1, 3, 32, 32), atol=1e-6)
