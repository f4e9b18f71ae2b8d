"""The VL-SAE encode's fast paths against their definitions (the normalisation, the top-k of
the distance formula, bit for bit) and the caches they read (C's contiguous copy, renewed when
the weights change)."""

import pytest
import torch
import torch.nn.functional as F
from helpers.spaces import small_space

from vlsae_hooks.spaces.autoencoder import VLSAE, top_activations, unit_rows

torch.set_num_threads(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_rows_are_f_normalize_bit_for_bit(dtype):
    """The cosines' normalisation without ``F.normalize``'s wrapper: the same bits, a zero row
    included."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2)).to(dtype)
    x[1] = 0
    assert torch.equal(unit_rows(x), F.normalize(x, dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_top_activations_are_the_distance_formula_bit_for_bit(dtype):
    """2 - sqrt(max(2 - 2 cos, 0)) in four operations is the formula's own value: 2 cos is
    exact, so one rounding of 2 - 2 cos is the two-step one (cosines past +-1 included)."""
    cos = torch.cat([torch.rand(4, 500, generator=torch.Generator().manual_seed(3)) * 2.2 - 1.1,
                     torch.tensor([[1.0, -1.0, 0.0, 1 + 1e-7, 1 - 1e-7] * 100])]).to(dtype)
    values, indices = top_activations(cos, 7)
    top, expected_indices = cos.topk(7, dim=-1)
    assert torch.equal(values, 2 - torch.sqrt(torch.clamp(2 - 2 * top, min=0)))
    assert torch.equal(indices, expected_indices) and values.dtype == dtype


def test_float32_cpu_cosines_use_a_contiguous_copy_of_the_concepts_renewed_on_change():
    """Without a gradient, a contiguous C^T kept between calls (MKL reads the transposed view
    of C out of memory at under half the speed); a changed C makes a new one; in bfloat16, with
    a gradient wanted, or off the CPU, the view itself (gradients reach C) and no copy kept."""
    sae = small_space().sae
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        kept = sae.concepts_by_dimension()
        assert kept.is_contiguous() and kept.data_ptr() != sae.concepts.data_ptr()
        assert torch.equal(kept, sae.concepts.T) and sae.concepts_by_dimension() is kept
        code_of_minus_x = sae.encode_topk(-x)
        sae.concepts.mul_(-1)  # cos(x, -C_j) = cos(-x, C_j): the code of -x, with the new copy
        renewed = sae.concepts_by_dimension()
        assert renewed is not kept and torch.equal(renewed, sae.concepts.T)
        for got, expected in zip(sae.encode_topk(x), code_of_minus_x, strict=True):
            assert torch.equal(got, expected)
        sae.to(torch.bfloat16)
        assert sae.concepts_by_dimension().data_ptr() == sae.concepts.data_ptr()
        assert "concepts_by_dimension" not in sae._derived
        sae.float()
    view = sae.concepts_by_dimension()
    assert view.data_ptr() == sae.concepts.data_ptr() and view.requires_grad
    sae.cosines(x).sum().backward()
    assert sae.concepts.grad.abs().sum() > 0
    sae.to("meta")
    assert sae.concepts_by_dimension().is_meta and "concepts_by_dimension" not in sae._derived


def test_weights_changed_where_torch_counts_no_version_are_read_again():
    """A space made under inference_mode keeps nothing (its parameters have no version counter,
    so a new state dict would go unseen); a write through ``.data`` is seen after
    ``forget_derived``."""
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    other = small_space(seed=1)
    with torch.inference_mode():
        space = small_space(seed=0)
        space.encode(x, "text")
        space.load_state_dict(other.state_dict())
        torch.testing.assert_close(space.encode(x, "text"), other.encode(x, "text"))
    space = small_space(seed=0)
    with torch.no_grad():
        space.encode(x, "text")
        space.sae.concepts.data.copy_(other.sae.concepts.data)
        space.sae.forget_derived()
        torch.testing.assert_close(space.sae.encode_topk(x), other.sae.encode_topk(x))


@pytest.mark.parametrize("k", [0, 65])
def test_a_vlsae_keeps_between_one_and_all_of_its_concepts(k):
    with pytest.raises(ValueError, match=rf"VLSAE needs 0 < k <= h, got k={k}, h=64"):
        VLSAE(16, 64, k)
    assert VLSAE(16, 64, 64).k == 64
