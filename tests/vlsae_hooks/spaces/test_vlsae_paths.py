"""A VL-SAE space's constructor refusals and its sparse paths at their edges: repeated indices
add up, a sparse decode comes back in the input's dtype, the fused text decoder takes values of
another dtype and keeps its columns concept-major."""

import pytest
import torch
from helpers.spaces import small_space, space_config

from vlsae_hooks import VLSAE, AuxAligner, ConceptSpace, VLSAESpace

torch.set_num_threads(1)


def test_a_space_whose_config_disagrees_with_its_modules_is_refused():
    with pytest.raises(ValueError, match=r"^config.has_aligner=True but aligner is None$"):
        VLSAESpace(VLSAE(8, 32, 4), None, space_config(has_aligner=True))
    with pytest.raises(ValueError, match=r"^config.has_aligner=False but aligner is given$"):
        VLSAESpace(VLSAE(8, 32, 4), AuxAligner(8), space_config(has_aligner=False))
    with pytest.raises(ValueError, match=r"^VLSAESpace needs config.kind 'vlsae', got 'lexvla'$"):
        VLSAESpace(VLSAE(8, 32, 4), AuxAligner(8), space_config(kind="lexvla"))


@pytest.mark.parametrize("decode_sparse", [ConceptSpace.decode_sparse, VLSAESpace.decode_sparse])
@pytest.mark.parametrize("modality", ["vision", "text"])
def test_repeated_indices_of_a_sparse_code_add_up(decode_sparse, modality):
    """The base class's dense fallback and the VL-SAE's own path both decode a code whose row
    names a concept twice as the code with the two values summed."""
    space = small_space()
    values = torch.tensor([[0.2, 0.3, 0.4, 0.5], [1.0, 0.25, 0.5, 0.75]])
    indices = torch.tensor([[1, 1, 3, 5], [7, 2, 7, 7]])
    dense = torch.zeros(2, 32)
    dense[0, 1], dense[0, 3], dense[0, 5] = 0.5, 0.4, 0.5
    dense[1, 7], dense[1, 2] = 2.25, 0.25
    with torch.no_grad():
        expected = space.decode(dense, modality)
        torch.testing.assert_close(decode_sparse(space, values, indices, modality), expected,
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("decode_sparse", [ConceptSpace.decode_sparse, VLSAESpace.decode_sparse])
def test_a_sparse_decode_comes_back_in_the_values_dtype(decode_sparse):
    space = small_space()  # float32
    values, indices = space.encode_sparse(torch.randn(3, 8), "text")
    with torch.no_grad():
        out = decode_sparse(space, values.to(torch.bfloat16), indices, "text")
        expected = space.decode_sparse(values.to(torch.bfloat16).float(), indices, "text")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.to(torch.bfloat16), atol=0, rtol=0)


def test_the_fused_text_decoder_takes_values_of_another_dtype_and_is_concept_major():
    space = small_space().to(torch.bfloat16)
    fused = space.fused_text_decoder()
    assert fused.columns.shape == (32, 8) and fused.columns.is_contiguous()
    assert fused.columns.dtype == fused.bias.dtype == torch.bfloat16
    values = torch.tensor([[0.5, 1.5, 0.25, 1.0]])
    indices = torch.tensor([[3, 0, 31, 8]])
    part = fused.linear_part(values, indices)  # float32 values, bfloat16 columns
    assert part.dtype == torch.bfloat16
    expected = (values.to(torch.bfloat16)[0, :, None] * fused.columns[indices[0]]).sum(0)
    torch.testing.assert_close(part[0], expected, atol=2e-2, rtol=2e-2)
