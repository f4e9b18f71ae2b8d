"""Held-out quality of a trained space: how well it reconstructs, and whether an image and its
own caption switch on the same concepts (against shuffled pairs as the chance level)."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from sae_training.sparse import encode, sparse_decode
from sae_training.store import ActivationStore
from vlsae_hooks.spaces.autoencoder import VLSAE, AuxAligner

log = logging.getLogger(__name__)


class _Variance:
    """Explained variance 1 - SSE / SST, accumulated in float64 over batches."""

    def __init__(self) -> None:
        self.sse = self.sum_sq = 0.0
        self.total: Tensor | float = 0.0
        self.n = 0

    def add(self, target: Tensor, recon: Tensor) -> None:
        target, recon = target.double(), recon.double()
        self.sse += float((target - recon).pow(2).sum())
        self.sum_sq += float(target.pow(2).sum())
        self.total = self.total + target.sum(0)
        self.n += len(target)

    def value(self, what: str = "") -> float:
        """1 - SSE / SST; nan when the rows have no spread (SST 0 up to rounding), where it is
        undefined."""
        sst = self.sum_sq - float((self.total ** 2).sum()) / self.n
        if sst <= 1e-12 * self.sum_sq:
            log.warning("the held-out %s rows are all the same: their explained variance is "
                        "undefined (nan)", what)
            return float("nan")
        return 1 - self.sse / sst


@torch.no_grad()
def evaluate(sae: VLSAE, aligner: AuxAligner | None, store: ActivationStore, rows: Tensor,
             batch_size: int = 512, device: torch.device | str = "cpu") -> dict:
    """Metrics on ``rows`` of ``store`` (the held-out split). Shuffled pairs match each image with
    the caption of the next row in its batch."""
    ev = {m: _Variance() for m in ("vision", "text")}
    aligner_ev = {m: _Variance() for m in ("vision", "text")}
    sums = {"matched": 0.0, "shuffled": 0.0, "matched_jaccard": 0.0, "shuffled_jaccard": 0.0,
            "matched_cosine": 0.0, "shuffled_cosine": 0.0, "l0": 0.0, "retrieval_top1": 0.0}
    fired = torch.zeros(sae.h, dtype=torch.bool, device=device)
    n = 0
    for start in range(0, len(rows), batch_size):
        vision, text = (x.to(device) for x in store.get(rows[start:start + batch_size]))
        b = len(vision)
        if aligner is not None:
            pv, pt = aligner.project(vision, "vision"), aligner.project(text, "text")
            aligner_ev["vision"].add(vision, aligner.reconstruct(pv, "vision"))
            aligner_ev["text"].add(text, aligner.reconstruct(pt, "text"))
            sums["retrieval_top1"] += float(((pv @ pt.T).argmax(1) ==
                                             torch.arange(b, device=device)).sum())
            vision, text = pv, pt
        code = encode(torch.cat([vision, text]), sae.concepts, sae.k)
        values, indices = code.values.detach(), code.indices
        for modality, x, s, dec in (("vision", vision, slice(0, b), sae.vision_decoder),
                                    ("text", text, slice(b, None), sae.text_decoder)):
            ev[modality].add(x, sparse_decode(values[s], indices[s], dec.weight, dec.bias))
        sums["l0"] += float((values > 0).sum()) / 2
        fired[indices.reshape(-1)] = True
        dense = torch.zeros(2 * b, sae.h, device=device).scatter_(1, indices, values)
        z_v, z_t = dense[:b], dense[b:]
        active_v = z_v > 0
        for name, partner in (("matched", torch.arange(b)), ("shuffled", torch.arange(b).roll(1))):
            t_idx = indices[b:][partner.to(device)]
            overlap = active_v.gather(1, t_idx).sum(1).double()
            sums[name] += float(overlap.sum()) / sae.k
            sums[f"{name}_jaccard"] += float((overlap / (2 * sae.k - overlap)).sum())
            sums[f"{name}_cosine"] += float(torch.nn.functional.cosine_similarity(
                z_v, z_t[partner.to(device)], dim=1).sum())
        n += b
    agreement = {name: sums[name] / n for name in ("matched", "shuffled", "matched_jaccard",
                                                   "shuffled_jaccard", "matched_cosine",
                                                   "shuffled_cosine")}
    metrics = {"explained_variance": {m: ev[m].value(m) for m in ev}, "l0": sums["l0"] / n,
               "concept_agreement": agreement,
               "fired_fraction_val": float(fired.float().mean()), "n_val": n}
    if aligner is not None:
        metrics["aligner"] = {"explained_variance": {m: aligner_ev[m].value(f"{m} (aligner)")
                                                     for m in ev},
                              "retrieval_top1": sums["retrieval_top1"] / n}
    return metrics


@torch.no_grad()
def dead_fraction(sae: VLSAE, aligner: AuxAligner | None, store: ActivationStore, rows: Tensor,
                  batch_size: int = 512, device: torch.device | str = "cpu") -> float:
    """Share of concepts that fire on none of ``rows`` (vision or text): measured after
    training, so resampling cannot make it look better than it is."""
    fired = torch.zeros(sae.h, dtype=torch.bool, device=device)
    for start in range(0, len(rows), batch_size):
        vision, text = (x.to(device) for x in store.get(rows[start:start + batch_size]))
        if aligner is not None:
            vision, text = aligner.project(vision, "vision"), aligner.project(text, "text")
        fired[sae.encode_topk(torch.cat([vision, text]))[1].reshape(-1)] = True
    return 1 - float(fired.float().mean())
