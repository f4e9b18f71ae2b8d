"""The training objectives against direct computations: the aligner's InfoNCE on unit
projections with its weighted terms, and AuxK on the detached residual from the dead concepts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sae_training.losses import AlignerObjective, SAEObjective, info_nce
from vlsae_hooks.spaces.autoencoder import VLSAE, AuxAligner


def test_aligner_objective_is_infonce_on_unit_projections_plus_weighted_terms() -> None:
    torch.manual_seed(0)
    aligner = AuxAligner(8)
    vision, text = torch.randn(16, 8) + 1, torch.randn(16, 8) - 1
    out = AlignerObjective(aligner, 0.5, normalize=True, pair_weight=0.25)(vision, text)
    with torch.no_grad():
        pv, pt = aligner.project(vision, "vision"), aligner.project(text, "text")
        nce = info_nce(F.normalize(pv, dim=-1), F.normalize(pt, dim=-1), 0.5)
        mse_v = F.mse_loss(aligner.reconstruct(pv, "vision"), vision)
        mse_t = F.mse_loss(aligner.reconstruct(pt, "text"), text)
        pair = F.mse_loss(pv, pt)
    torch.testing.assert_close(out["infonce"], nce)
    torch.testing.assert_close(out["mse_pair"], pair)
    torch.testing.assert_close(out["loss"].detach(), nce + mse_v + mse_t + 0.25 * pair)


def test_auxk_reconstructs_the_detached_residual_from_the_top_dead_concepts_only() -> None:
    """Fewer dead concepts than k_aux: AuxK uses just those, decodes without the bias, and
    enters the loss scaled by auxk_coef; k_aux defaults to d // 2."""
    torch.manual_seed(6)
    n, d, h, k = 20, 16, 64, 4
    sae = VLSAE(d, h, k).double()
    with torch.no_grad():
        sae.vision_decoder.bias.fill_(0.5)
        sae.text_decoder.bias.fill_(-0.5)
    vision = torch.randn(n, d, dtype=torch.float64) + 1
    text = torch.randn(n, d, dtype=torch.float64) - 1
    dead = torch.zeros(h, dtype=torch.bool)
    dead[[3, 17, 40]] = True
    assert SAEObjective(sae).k_aux == d // 2
    out = SAEObjective(sae, auxk_coef=0.25, k_aux=6)(vision, text, dead)
    with torch.no_grad():
        x = torch.cat([vision, text])
        cos = F.normalize(x, dim=-1) @ F.normalize(sae.concepts, dim=-1).T
        act = 2 - torch.sqrt(2 - 2 * cos)

        def code(indices):
            return torch.zeros_like(cos).scatter(1, indices, act.gather(1, indices))

        z = code(cos.topk(k, dim=-1).indices)
        recon_v, recon_t = sae.vision_decoder(z[:n]), sae.text_decoder(z[n:])
        mse = F.mse_loss(recon_v, vision) + F.mse_loss(recon_t, text)
        z_aux = code(dead.nonzero()[:, 0].expand(2 * n, -1))  # all three dead ones
        auxk = (F.mse_loss(z_aux[:n] @ sae.vision_decoder.weight.T, vision - recon_v)
                + F.mse_loss(z_aux[n:] @ sae.text_decoder.weight.T, text - recon_t))
    torch.testing.assert_close(out["auxk"], auxk)
    torch.testing.assert_close(out["loss"].detach(), mse + 0.25 * auxk)
