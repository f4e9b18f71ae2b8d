"""Training objectives, as modules so that accelerate / DDP wrap the whole loss computation.

Aligner (stage 1): symmetric InfoNCE on the raw projections (dot products / temperature; the
reference leaves them unnormalised) + MSE reconstruction of each modality, weighted 1:1:1.
VL-SAE (stage 2): MSE(vision through the vision decoder) + MSE(text through the text decoder),
plus AuxK: the top ``k_aux`` dead concepts reconstruct the residual, which gives dead concepts a
gradient towards directions the live ones miss (Gao et al. 2024, "Scaling and evaluating sparse
autoencoders").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_training.distributed import gather_across_processes
from sae_training.sparse import encode, sparse_decode
from vlsae_hooks.spaces.autoencoder import VLSAE, AuxAligner


def info_nce(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE; row i of ``a`` and row i of ``b`` are the positive pair."""
    logits = a @ b.T / temperature
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class AlignerObjective(nn.Module):
    def __init__(self, aligner: AuxAligner, temperature: float, normalize: bool = False,
                 pair_weight: float = 0.0) -> None:
        super().__init__()
        self.aligner, self.temperature = aligner, temperature
        self.normalize, self.pair_weight = normalize, pair_weight

    def forward(self, vision: Tensor, text: Tensor) -> dict[str, Tensor]:
        pv = self.aligner.project(vision, "vision")
        pt = self.aligner.project(text, "text")
        a, b = pv.float(), pt.float()
        if self.normalize:
            a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        nce = info_nce(gather_across_processes(a), gather_across_processes(b), self.temperature)
        mse_v = F.mse_loss(self.aligner.reconstruct(pv, "vision").float(), vision)
        mse_t = F.mse_loss(self.aligner.reconstruct(pt, "text").float(), text)
        out = {"infonce": nce.detach(), "mse_vision": mse_v.detach(),
               "mse_text": mse_t.detach()}
        loss = nce + mse_v + mse_t
        if self.pair_weight > 0:
            pair = F.mse_loss(pv.float(), pt.float())
            loss = loss + self.pair_weight * pair
            out["mse_pair"] = pair.detach()
        out["loss"] = loss
        return out


class SAEObjective(nn.Module):
    """Reconstruction loss of a ``VLSAE`` on (vision, text) pairs, with optional AuxK."""

    def __init__(self, sae: VLSAE, auxk_coef: float = 1 / 32, k_aux: int | None = None) -> None:
        super().__init__()
        self.sae, self.auxk_coef = sae, auxk_coef
        self.k_aux = k_aux if k_aux is not None else max(1, sae.d // 2)

    def forward(self, vision: Tensor, text: Tensor, dead: Tensor | None = None
                ) -> dict[str, Tensor]:
        """``dead``: bool [h] mask of concepts AuxK may use. Also returns the active
        ``indices`` [2n, k] (vision rows first) for firing statistics."""
        n, sae = len(vision), self.sae
        decoders = (sae.vision_decoder, sae.text_decoder)
        targets = (vision, text)
        code = encode(torch.cat(targets), sae.concepts, sae.k)
        recon = [sparse_decode(code.values[s], code.indices[s], dec.weight, dec.bias)
                 for s, dec in zip((slice(0, n), slice(n, None)), decoders)]
        mse = [F.mse_loss(r, x) for r, x in zip(recon, targets)]  # sparse path runs in fp32
        out = {"mse_vision": mse[0].detach(), "mse_text": mse[1].detach(),
               "indices": code.indices}
        loss = mse[0] + mse[1]
        n_dead = int(dead.sum()) if dead is not None else 0
        if self.auxk_coef > 0 and n_dead > 0:
            m = min(self.k_aux, n_dead)
            scores = code.cos.masked_fill(~dead, float("-inf"))
            aux_indices = scores.topk(m, dim=-1).indices.sort(dim=-1).values
            aux_values = code.select(aux_indices)
            auxk = sum(F.mse_loss(sparse_decode(aux_values[s], aux_indices[s], dec.weight),
                                  (x - r).detach())
                       for s, dec, x, r in zip((slice(0, n), slice(n, None)), decoders, targets,
                                               recon))
            loss = loss + self.auxk_coef * auxk
            out["auxk"] = auxk.detach()
        out["loss"] = loss
        return out
