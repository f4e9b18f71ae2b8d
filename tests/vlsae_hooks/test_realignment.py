"""The realignment maths (the fused per-step path against the space's own encode / decode, and
the dense formula) and the contrast of logits, checked by hand."""

import math

import pytest
import torch
from helpers.spaces import small_space

from vlsae_hooks import VLSAESpace, attach
from vlsae_hooks.realignment import (
    Realigner,
    contrast_logits,
    cutoff_logits,
    mixed_code,
    realigned_text,
)

torch.set_num_threads(1)


def test_realigned_text_matches_dense_formula(space):
    torch.manual_seed(0)
    v, t = torch.randn(3, 64), torch.randn(3, 64)
    values, indices = space.encode_sparse(v, "vision")
    delta = 0.3 * (realigned_text(space, values, indices, t, image_weight=0.6) - t)
    z = 0.4 * space.encode(t, "text") + 0.6 * space.encode(v, "vision")
    torch.testing.assert_close(delta, 0.3 * (space.decode(z, "text") - t), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("has_aligner", [True, False])
@pytest.mark.parametrize("image_weight", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_realigner_equals_realigned_text(has_aligner, image_weight, dtype):
    """The image's part decoded once plus the text's part per step = the whole mixed code
    through the space's modules (same values up to float rounding), float32 t~ - t [B, 1, d]
    from a space in any dtype."""
    space = small_space(has_aligner=has_aligner).to(dtype)
    generator = torch.Generator().manual_seed(1)
    v, t = torch.randn(3, 8, generator=generator), torch.randn(3, 8, generator=generator)
    values, indices = space.encode_sparse(v, "vision")
    realigner = Realigner(space, 0.3, image_weight)
    term = realigner.image_term(values, indices)
    expected = 0.3 * (realigned_text(space, values, indices, t, image_weight) - t)
    assert expected.abs().max() > 0.1
    offset = realigner.offset(values, indices, term, t)
    assert offset.dtype == torch.float32 and offset.shape == (3, 1, 8)
    tolerance = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(0.3 * offset[:, 0], expected, atol=tolerance, rtol=1e-5)


def test_at_image_weight_one_the_text_is_never_encoded(monkeypatch):
    """w = 1: the mixed code is the image's code itself (k wide, not 2k), on either path, and
    neither a step nor ``realigned_text`` encodes the text mean (the same numbers, less work)."""
    space = small_space()
    generator = torch.Generator().manual_seed(2)
    v, t = torch.randn(3, 8, generator=generator), torch.randn(3, 8, generator=generator)
    values, indices = space.encode_sparse(v, "vision")
    realigner = Realigner(space, 0.3, 1.0)
    term = realigner.image_term(values, indices)

    def refuse(*args, **kwargs):
        raise AssertionError("the text was encoded at image_weight 1")

    monkeypatch.setattr(realigner, "encode_text", refuse)
    monkeypatch.setattr(space, "encode_sparse", refuse)
    assert mixed_code(space, values, indices, t, 1.0) == (values, indices)
    offset = realigner.offset(values, indices, term, t)
    torch.testing.assert_close(offset[:, 0], realigned_text(space, values, indices, t, 1.0) - t,
                               atol=1e-6, rtol=1e-5)


class UnfusedSpace(VLSAESpace):
    """The same space with no fused text decoder: realignment through encode / decode."""

    def fused_text_decoder(self):
        return None


class NoStepEncoderSpace(VLSAESpace):
    """The same space with a fused text decoder but no step encoder: a step encodes the text
    mean with ``encode_sparse`` and weighs its code itself."""

    def text_step_encoder(self):
        return None


def test_a_fused_decoder_without_a_step_encoder_weighs_the_texts_code():
    """The text's code enters the mixed code times 1 - w there too (0.4 here, not 1)."""
    base = small_space()
    space = NoStepEncoderSpace(base.sae, base.aligner, base.config)
    generator = torch.Generator().manual_seed(1)
    v, t = torch.randn(3, 8, generator=generator), torch.randn(3, 8, generator=generator)
    values, indices = space.encode_sparse(v, "vision")
    realigner = Realigner(space, 0.3, 0.6)
    offset = realigner.offset(values, indices, realigner.image_term(values, indices), t)
    expected = realigned_text(space, values, indices, t, 0.6) - t
    torch.testing.assert_close(offset[:, 0], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["shift", "contrast"])
def test_a_space_without_a_fused_path_steers_the_same(model, space, batch, mode):
    unfused = UnfusedSpace(space.sae, space.aligner, space.config)
    assert Realigner(unfused, 1.0, 0.5).image_term(*space.encode_sparse(torch.ones(1, 64),
                                                                         "vision")) is None
    runs = []
    for concept_space in (space, unfused):
        with torch.no_grad(), attach(model, concept_space, mode=mode, alpha=1.0,
                                     image_weight=0.5):
            out = model.generate(**batch, max_new_tokens=4, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        runs.append(out)
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(torch.stack(runs[0].scores), torch.stack(runs[1].scores),
                               atol=1e-4, rtol=1e-4)


def test_contrast_logits_by_hand():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    plain, steered = probs.log(), torch.tensor([1.0, 2.0, 3.0, 4.0])
    # keeps p >= 0.25: tokens 0 and 1
    out = contrast_logits(plain, steered, contrast_weight=0.25, plausibility_cutoff=0.5)
    expected = torch.tensor([0.75 * math.log(0.5) + 0.25, 0.75 * math.log(0.3) + 0.5,
                             -math.inf, -math.inf])
    torch.testing.assert_close(out, expected)
    none_survive = contrast_logits(plain, steered, contrast_weight=0.25, plausibility_cutoff=2.0)
    assert torch.equal(none_survive, plain)
    assert torch.equal(contrast_logits(plain, steered, contrast_weight=0.0,
                                       plausibility_cutoff=0.0), plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cutoff_logits_are_contrast_at_weight_zero(dtype):
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    plain = probs.log().to(dtype)
    # row 0 keeps p >= 0.2: tokens 0 and 1; row 1 keeps all four
    expected = plain.clone()
    expected[0, 2:] = -math.inf
    assert torch.equal(cutoff_logits(plain, 0.4), expected)
    assert cutoff_logits(plain, 0.4).dtype == dtype
    with pytest.raises(ValueError, match=r"plausibility_cutoff must be in \[0, 1\], got 2.0"):
        cutoff_logits(plain, 2.0)
    wide = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)).to(dtype)
    wide[1, :500] = -math.inf  # rows partly and wholly -inf, with +inf, with nan
    wide[2] = -math.inf
    wide[3, 7] = math.inf
    wide[4, 9] = math.nan
    for cutoff in (0.0, 0.3, 0.9, 1.0):
        torch.testing.assert_close(cutoff_logits(wide, cutoff),
                                   contrast_logits(wide, torch.randn_like(wide), 0.0, cutoff),
                                   rtol=0, atol=0, equal_nan=True)
