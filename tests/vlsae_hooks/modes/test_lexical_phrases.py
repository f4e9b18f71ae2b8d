"""LexVLA steering of two-word phrase units ("red star"): after the first word, the second word
reads the phrase's evidence instead of its own, on device, and phrases of word-start pieces (a
Llama vocabulary's) are bound too."""

from __future__ import annotations

import torch
from helpers.host_reads import reads_inside_forwards
from helpers.spaces import lexvla_space

import vlsae_hooks
from vlsae_hooks.modes.lexical import evidence_shift
from vlsae_hooks.spaces import SpaceConfig
from vlsae_hooks.spaces.lexvla import LexVLASpace
from vlsae_hooks.testing import left_pad, llava_prompt

STRENGTH = 3.0


def phrase_space() -> LexVLASpace:
    """Words red / blue / star on tokens 10 / 20 / 30 and the phrases "red star", "blue star"."""
    torch.manual_seed(5)
    words = ["red", "blue", "star", "red star", "blue star"]
    config = SpaceConfig(
        kind="lexvla", d_model=16, n_concepts=5, k=5, model_name="tiny", model_type="llava",
        site="pixel_values", layer=None, has_aligner=False, source="lexvla",
        extra={"backbone": dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, mlp_ratio=2),
               "adapter": {"n_heads": 2, "d_hidden": 16}, "vocabulary": words,
               "vlm_token_ids": [10, 20, 30, -1, -1], "image_size": 32, "pixel_mean": [0.5] * 3,
               "pixel_std": [0.5] * 3, "vlm_pixel_mean": [0.48, 0.46, 0.41],
               "vlm_pixel_std": [0.27, 0.26, 0.28]})
    space = LexVLASpace(config)
    torch.nn.init.normal_(space.vision_codebook)
    return space.eval()


@torch.no_grad()
def test_phrases_bind_the_second_word_to_the_first(model):
    space = phrase_space()
    batch = left_pad([llava_prompt([5, 10]), llava_prompt([5, 20]), llava_prompt([5, 6])])
    batch["pixel_values"] = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    evidence = space.image_vectors(space.from_vlm_pixels(batch["pixel_values"]))
    words, phrases = evidence_shift(evidence[:, :3], STRENGTH), evidence_shift(evidence[:, 3:],
                                                                              STRENGTH)
    assert (phrases < 0).any()
    plain = model(**batch).logits
    with vlsae_hooks.attach(model, space, strength=STRENGTH):
        steered = model(**batch).logits
    moved = steered[..., [10, 20, 30]] - plain[..., [10, 20, 30]]
    # every position but the next-token one: the words' own evidence
    assert torch.allclose(moved[:, :-1], words[:, None, :].expand(-1, moved.shape[1] - 1, -1),
                          atol=1e-5)
    # next token: "star" after "red" reads "red star", after "blue" reads "blue star"
    assert torch.allclose(moved[0, -1], torch.stack([words[0, 0], words[0, 1], phrases[0, 0]]),
                          atol=1e-5)
    assert torch.allclose(moved[1, -1], torch.stack([words[1, 0], words[1, 1], phrases[1, 1]]),
                          atol=1e-5)
    assert torch.allclose(moved[2, -1], words[2], atol=1e-5)  # no colour before: no binding
    with vlsae_hooks.attach(model, space, strength=STRENGTH, bind_phrases=False):
        unbound = model(**batch).logits
    assert torch.allclose(unbound[..., [10, 20, 30]] - plain[..., [10, 20, 30]],
                          words[:, None, :].expand_as(moved), atol=1e-5)


def test_a_decoding_step_with_phrases_reads_nothing_back(model):
    """Phrase binding runs on device: 6 generated tokens add no host read to 1 token's."""
    space = phrase_space()
    batch = left_pad([llava_prompt([5, 10]), llava_prompt([5, 6])])
    batch["pixel_values"] = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    plain = {n: reads_inside_forwards(model, batch, n) for n in (1, 6)}
    with vlsae_hooks.attach(model, space, strength=STRENGTH):
        steered = {n: reads_inside_forwards(model, batch, n) for n in (1, 6)}
    assert steered[6] - plain[6] == steered[1] - plain[1]


def test_phrases_of_words_kept_as_word_start_pieces_are_bound():
    space = lexvla_space([10, 20, 30])
    space.words = ["▁red", "▁star", "red star"]  # as LexVLA training keeps a Llama vocabulary
    space.vlm_token_ids = torch.tensor([10, 20, -1])
    units, first, second = space.phrase_tokens()
    assert (units.tolist(), first.tolist(), second.tolist()) == ([2], [10], [20])
