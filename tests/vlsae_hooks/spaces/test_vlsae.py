"""Concept spaces: the VL-SAE maths, sparse vs dense paths, save/load and its validation."""

import json
import math

import pytest
import torch
from helpers.spaces import small_space, space_config
from safetensors.torch import load_file, save_file

from vlsae_hooks import VLSAE, ConceptSpace, SpaceConfig, VLSAESpace, load_space

torch.set_num_threads(1)


def test_encode_matches_distance_definition():
    torch.manual_seed(0)
    sae = VLSAE(d=8, h=32, k=4)
    x = torch.randn(3, 8)
    unit_x = x / x.norm(dim=-1, keepdim=True)
    unit_c = sae.concepts / sae.concepts.norm(dim=-1, keepdim=True)
    distance = (unit_x[:, None, :] - unit_c[None, :, :]).norm(dim=-1)  # [3, 32]
    full = 2 - distance
    expected = torch.zeros_like(full)
    top = full.topk(4, dim=-1)
    expected.scatter_(-1, top.indices, top.values)
    z = sae.encode(x)
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=0)
    assert ((z != 0).sum(-1) == 4).all()
    assert (z >= 0).all() and (z <= 2).all()


def test_sparse_decode_equals_dense_decode():
    torch.manual_seed(1)
    sae = VLSAE(d=8, h=32, k=4)
    x = torch.randn(2, 5, 8)
    values, indices = sae.encode_topk(x)
    for modality in ("vision", "text"):
        dense = sae.decode(sae.encode(x), modality)
        torch.testing.assert_close(sae.decode_topk(values, indices, modality), dense)
    assert not torch.allclose(sae.decode(sae.encode(x), "vision"),
                              sae.decode(sae.encode(x), "text"))


def test_space_composes_aligner_and_sae():
    space = small_space()
    x = torch.randn(4, 8)
    z = space.encode(x, "text")
    torch.testing.assert_close(z, space.sae.encode(space.aligner.text_projection(x)))
    out = space.decode(z, "text")
    torch.testing.assert_close(out, space.aligner.text_decoder(space.sae.text_decoder(z)))
    torch.testing.assert_close(space.encode(x, "vision"),
                               space.sae.encode(space.aligner.vision_projection(x)))
    values, indices = space.encode_sparse(x, "vision")
    torch.testing.assert_close(space.decode_sparse(values, indices, "vision"),
                               space.decode(space.encode(x, "vision"), "vision"))


def test_base_sparse_defaults_agree_with_fast_path():
    space = small_space()
    x = torch.randn(3, 8)
    values, indices = ConceptSpace.encode_sparse(space, x, "text")
    fast_values, fast_indices = space.encode_sparse(x, "text")
    assert set(indices[0].tolist()) == set(fast_indices[0].tolist())
    torch.testing.assert_close(ConceptSpace.decode_sparse(space, values, indices, "text"),
                               space.decode_sparse(fast_values, fast_indices, "text"))


@pytest.mark.parametrize("has_aligner", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_text_step_encoder_gives_encode_sparse_scaled(has_aligner, dtype):
    """Shift and contrast encode the text mean at every step with the tensors read at attach,
    in fewer operations: the same concepts, the values to rounding (a zero row included), times
    the scale, in the space's dtype."""
    space = small_space(has_aligner=has_aligner).to(dtype)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    x[1] = 0
    encoder = space.text_step_encoder()
    values, indices = encoder.encode_sparse(x)
    expected_values, expected_indices = space.encode_sparse(x, "text")
    assert values.dtype == dtype and torch.isfinite(values).all()
    assert torch.equal(indices, expected_indices)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(values, expected_values.detach(), atol=tolerance, rtol=tolerance)
    if dtype == torch.float32 and not has_aligner:  # a zero row: every cosine 0 (|x| floored)
        torch.testing.assert_close(values[1], torch.full((values.shape[1],), 2 - math.sqrt(2)))
    scaled, scaled_indices = encoder.encode_sparse(x, scale=0.4)
    assert torch.equal(scaled_indices, indices)
    torch.testing.assert_close(scaled, 0.4 * values, atol=tolerance, rtol=tolerance)
    if has_aligner:  # the aligner's text projection, not its vision one
        assert not torch.equal(indices, space.encode_sparse(x, "vision")[1])


def test_the_text_step_encoder_is_finite_along_a_concept():
    """A text mean along a concept: its cosine rounds to just over 1, so 2 - 2 cos to just
    below 0, whose square root is nan unless clamped (as ``encode_sparse`` clamps)."""
    space = small_space(has_aligner=False)
    x = space.sae.concepts.detach() * 3.0
    values, indices = space.text_step_encoder().encode_sparse(x)
    expected_values, expected_indices = space.encode_sparse(x, "text")
    assert torch.isfinite(values).all()
    torch.testing.assert_close(values, expected_values.detach(), atol=2e-3, rtol=0)


def test_dtype_follows_the_input():
    space = small_space()
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert space.encode(x, "vision").dtype == torch.bfloat16
    assert space.decode(space.encode(x, "text"), "text").dtype == torch.bfloat16
    assert space.dtype == torch.float32


def test_save_load_roundtrip(tmp_path):
    space = small_space()
    space.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert keys == {"sae.concepts", "sae.vision_decoder.weight", "sae.vision_decoder.bias",
                    "sae.text_decoder.weight", "sae.text_decoder.bias",
                    *(f"aligner.{m}.{p}" for m in ("vision_projection", "text_projection",
                                                   "vision_decoder", "text_decoder")
                      for p in ("weight", "bias"))}
    loaded = load_space(tmp_path)
    assert isinstance(loaded, VLSAESpace) and loaded.config == space.config
    assert isinstance(ConceptSpace.from_pretrained(tmp_path), VLSAESpace)
    x = torch.randn(3, 8)
    assert torch.equal(loaded.encode(x, "text"), space.encode(x, "text"))
    assert torch.equal(VLSAESpace.from_pretrained(tmp_path).decode(space.encode(x, "text"), "text"),
                       space.decode(space.encode(x, "text"), "text"))


def test_save_load_without_aligner_and_half_precision(tmp_path):
    space = small_space(has_aligner=False).half()
    space.save_pretrained(tmp_path)
    loaded = load_space(tmp_path)
    assert loaded.aligner is None and loaded.dtype == torch.float16
    assert torch.equal(loaded.sae.concepts, space.sae.concepts)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_space(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_space(tmp_path)
    space = small_space()
    space.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="lacks model.safetensors"):
        load_space(tmp_path)
    (tmp_path / "other.safetensors").rename(tmp_path / "model.safetensors")

    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "kind": "nosuchkind"}))
    with pytest.raises(ValueError, match="unknown concept-space kind 'nosuchkind'"):
        load_space(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "kind": "lexvla"}))
    with pytest.raises(ValueError, match="lacks"):
        load_space(tmp_path)
    with pytest.raises(ValueError, match="holds a 'lexvla' space"):
        VLSAESpace.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**config, "n_concepts": 64}))
    with pytest.raises(ValueError,
                       match=r"sae.concepts has shape \(32, 8\), config implies \(64, 8\)"):
        load_space(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**config, "has_aligner": False}))
    with pytest.raises(ValueError, match="unexpected"):
        load_space(tmp_path)

    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in state.items() if k != "sae.concepts"},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['sae.concepts'\]"):
        load_space(tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="site must be one of"):
        space_config(site="middle")
    with pytest.raises(ValueError, match="needs a decoder layer index"):
        space_config(layer=None)
    with pytest.raises(ValueError, match="0 < k <= n_concepts"):
        space_config(k=64)
    with pytest.raises(ValueError, match="lacks fields"):
        SpaceConfig.from_dict({"kind": "vlsae"})
    good = space_config().to_dict()
    for field, value, message in (("k", "4", "k must be a positive integer, got '4'"),
                                  ("n_concepts", 32.0, "n_concepts must be a positive integer"),
                                  ("d_model", -8, "d_model must be a positive integer"),
                                  ("has_aligner", "false", "has_aligner must be true or false"),
                                  ("extra", None, "extra must be a mapping"),
                                  ("model_name", 7, "model_name must be a string")):
        with pytest.raises(ValueError, match=message):
            SpaceConfig.from_dict({**good, field: value})
    with pytest.raises(ValueError, match="a JSON object, got NoneType"):
        SpaceConfig.from_dict(None)
    with pytest.raises(ValueError, match="disagrees with config"):
        VLSAESpace(VLSAE(8, 16, 4), None, space_config(has_aligner=False))
    with pytest.raises(ValueError, match="modality must be one of"):
        small_space().encode(torch.randn(8), "audio")


def test_inference_caches_follow_weight_updates_and_keep_gradients():
    torch.manual_seed(4)
    sae = VLSAE(d=8, h=32, k=4)
    x = torch.randn(2, 8)
    with torch.no_grad():
        first = sae.encode(x)
        values, indices = sae.encode_topk(x)
        decoded = sae.decode_topk(values, indices, "text")
        sae.concepts.mul_(-1)  # an optimiser step, in place
        sae.text_decoder.weight.add_(1.0)
        fresh = VLSAE(d=8, h=32, k=4)
        fresh.load_state_dict(sae.state_dict())
        assert torch.equal(sae.encode(x), fresh.encode(x))
        assert not torch.equal(sae.encode(x), first)
        assert torch.equal(sae.decode_topk(values, indices, "text"),
                           fresh.decode_topk(values, indices, "text"))
        assert not torch.equal(sae.decode_topk(values, indices, "text"), decoded)
    values, indices = sae.encode_topk(x)
    sae.decode_topk(values, indices, "vision").sum().backward()
    assert sae.concepts.grad is not None and sae.vision_decoder.weight.grad is not None


def test_decoder_weights_stay_concept_major_through_save_and_load(tmp_path):
    """The sparse training kernels' speed rests on each concept's decoder column being
    contiguous in memory; a saved and reloaded space must keep that layout and its values."""
    space = small_space()
    space.save_pretrained(tmp_path)
    loaded = load_space(tmp_path)
    for s in (space, loaded):
        for modality in ("vision", "text"):
            weight = s.sae.decoder(modality).weight
            assert weight.shape == (8, 32) and weight.T.is_contiguous()
    torch.testing.assert_close(loaded.sae.text_decoder.weight, space.sae.text_decoder.weight)


def test_moving_a_space_moves_its_readouts_and_attach_then_steers_it_as_it_is():
    """A space moved to a device with ``to`` brings its readouts (their dtype kept), so
    ``placed_space`` (what attach calls) takes it as it is instead of copying it whole."""
    from vlsae_hooks.phrase_evidence import PhraseReadout
    from vlsae_hooks.site import placed_space
    from vlsae_hooks.word_evidence import WordReadout

    space = small_space().eval()
    space.word_readout = WordReadout(torch.randn(32, 3), torch.zeros(3), torch.arange(3),
                                     torch.zeros(3))
    space.phrase_readout = PhraseReadout(torch.randn(32, 2), torch.zeros(2), torch.arange(2),
                                         torch.zeros(2), torch.arange(2))
    assert placed_space(space, torch.device("meta")) is not space  # readouts elsewhere: a copy
    assert space.to(torch.float64).word_readout.weight.dtype == torch.float32  # dtype kept
    assert space.to("meta") is space
    for readout in (space.word_readout, space.phrase_readout):
        assert all(getattr(readout, name).is_meta for name in readout.TENSORS)
    assert placed_space(space, torch.device("meta")) is space
