"""The training fast path against the naive formulas: same top-k, same values, same gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sae_training.losses import SAEObjective, info_nce
from sae_training.sparse import encode, reconstruct, sparse_decode
from vlsae_hooks.spaces.autoencoder import VLSAE


def naive_topk(x: torch.Tensor, concepts: torch.Tensor, k: int):
    """a_j = 2 - || x/|x| - C_j/|C_j| || by explicit distances, then top-k."""
    xn = x / x.norm(dim=-1, keepdim=True)
    cn = concepts / concepts.norm(dim=-1, keepdim=True)
    activations = 2 - (xn[:, None, :] - cn[None, :, :]).norm(dim=-1)
    return activations.topk(k, dim=-1)


def dense_loss(sae: VLSAE, vision: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The same loss with a dense h-wide code and plain autograd."""
    x = torch.cat([vision, text])
    values, indices = naive_topk(x, sae.concepts, sae.k)
    z = torch.zeros(len(x), sae.h, dtype=x.dtype).scatter(1, indices, values)
    n = len(vision)
    return F.mse_loss(sae.vision_decoder(z[:n]), vision) + F.mse_loss(sae.text_decoder(z[n:]),
                                                                        text)


def test_encoder_topk_equals_the_distance_formula() -> None:
    torch.manual_seed(0)
    sae = VLSAE(24, 96, 7).double()
    x = torch.randn(40, 24, dtype=torch.float64) * 5 + 1
    ref_values, ref_indices = naive_topk(x, sae.concepts, 7)
    code = encode(x, sae.concepts, 7)
    order = ref_indices.sort(dim=-1)
    assert torch.equal(code.indices, order.values)
    torch.testing.assert_close(code.values, ref_values.gather(1, order.indices), atol=1e-6,
                               rtol=0)
    values, indices = sae.encode_topk(x)  # the runtime's encoder agrees too
    assert torch.equal(indices.sort(dim=-1).values, order.values)
    torch.testing.assert_close(values, ref_values, atol=1e-6, rtol=0)


def test_sparse_loss_and_gradients_equal_dense_autograd() -> None:
    torch.manual_seed(1)
    sae = VLSAE(16, 64, 5).double()
    vision = torch.randn(12, 16, dtype=torch.float64) + 2
    text = torch.randn(12, 16, dtype=torch.float64) - 1
    dense = dense_loss(sae, vision, text)
    dense.backward()
    expected = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    ours = SAEObjective(sae, auxk_coef=0.0)(vision, text)["loss"]
    ours.backward()
    torch.testing.assert_close(ours, dense, atol=1e-10, rtol=0)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-9, rtol=1e-7, msg=name)


def test_sparse_decode_and_input_gradient() -> None:
    torch.manual_seed(2)
    sae = VLSAE(8, 32, 4).double()
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    ours = reconstruct(sae, x, "text")
    torch.testing.assert_close(ours, sae(x, "text"))
    torch.autograd.gradcheck(lambda v: sparse_decode(v, torch.tensor([[1, 5, 9]] * 2),
                                                     sae.text_decoder.weight),
                             torch.rand(2, 3, dtype=torch.float64, requires_grad=True))
    grad_ours, = torch.autograd.grad(ours.sum(), x)
    grad_ref, = torch.autograd.grad(sae(x, "text").sum(), x)
    torch.testing.assert_close(grad_ours, grad_ref)


def test_auxk_only_moves_dead_concepts() -> None:
    torch.manual_seed(3)
    sae = VLSAE(16, 64, 4)
    vision, text = torch.randn(32, 16), torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[40:] = True
    objective = SAEObjective(sae, auxk_coef=1.0, k_aux=6)
    base, = torch.autograd.grad(SAEObjective(sae, auxk_coef=0.0)(vision, text)["loss"],
                                sae.concepts)
    out = objective(vision, text, dead)
    assert out["auxk"] > 0
    with_aux, = torch.autograd.grad(out["loss"], sae.concepts)
    change = (with_aux - base).abs().sum(dim=1)
    assert change[40:].max() > 1e-4 and change[:40].max() < 1e-7
    live = out["indices"].unique()
    assert not torch.isin(live, torch.arange(40, 64)).all()


def test_bf16_autocast_runs_and_keeps_fp32_grads() -> None:
    torch.manual_seed(4)
    sae = VLSAE(64, 256, 8)
    vision, text = torch.randn(16, 64), torch.randn(16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = SAEObjective(sae)(vision, text, torch.zeros(256, dtype=torch.bool))["loss"]
        assert encode(vision, sae.concepts, 8).cos.dtype == torch.float32  # top-k picked in fp32
    loss.backward()
    with torch.no_grad():
        reference = SAEObjective(sae)(vision, text)["loss"]
    assert abs(loss.item() - reference.item()) < 0.05 * float(reference)
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in sae.parameters())


def test_a_row_on_a_concept_activates_it_fully_and_a_zero_concept_stays_finite() -> None:
    """2 - sqrt(2 - 2 cos) at cos = 1 is 2 less the square root of the 1e-12 floor; a concept
    of norm 0 has cosine 0 with every row (as under F.normalize), not NaN."""
    torch.manual_seed(6)
    concepts = torch.randn(12, 8, dtype=torch.float64)
    concepts[5] = 0
    x = torch.cat([3 * concepts[:2], torch.randn(4, 8, dtype=torch.float64)]).requires_grad_()
    concepts.requires_grad_()
    code = encode(x, concepts, 3)
    cos = F.normalize(x, dim=-1) @ F.normalize(concepts, dim=-1).T
    assert torch.equal(code.indices, cos.topk(3).indices.sort().values)
    torch.testing.assert_close(code.cos, cos.detach(), atol=1e-12, rtol=0)
    for row in (0, 1):  # rows 0 and 1 lie on concepts 0 and 1
        torch.testing.assert_close(code.values[row][code.indices[row] == row],
                                   torch.tensor([2 - 1e-6], dtype=torch.float64), atol=1e-9,
                                   rtol=0)
    code.values.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(concepts.grad).all()


def test_info_nce_is_low_for_matched_and_symmetric() -> None:
    torch.manual_seed(5)
    a = 2 * torch.eye(8)
    assert info_nce(a, a, 0.07) < 1e-3 < 10 < info_nce(a, a.roll(1, 0), 0.07)
    a, b = torch.randn(8, 4), torch.randn(8, 4)
    torch.testing.assert_close(info_nce(a, b, 0.5), info_nce(b, a, 0.5))

