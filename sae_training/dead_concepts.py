"""Dead concepts: concepts that fired on none of the last ``dead_after`` training rows. The SAE's
auxiliary loss aims at them, and resampling re-aims them at the pairs the SAE reconstructs
worst, so the dictionary does not lose width to them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_training.sparse import reconstruct
from vlsae_hooks.spaces import VLSAE


class DeadConcepts:
    """Counts, per concept, the training rows seen since it last fired."""

    def __init__(self, h: int, dead_after: int, device: torch.device) -> None:
        self.since_fired = torch.zeros(h, dtype=torch.long, device=device)
        """Rows since each concept last fired; saved in and restored from the checkpoint."""
        self.dead_after = dead_after
        """Rows without firing after which a concept counts as dead."""

    def mask(self) -> Tensor:
        """Bool [h]: the dead concepts."""
        return self.since_fired >= self.dead_after

    def record(self, fired: Tensor, rows: int) -> None:
        """``rows`` more training rows have passed; the concepts where ``fired`` > 0 fired."""
        self.since_fired += rows
        self.since_fired[fired > 0] = 0


@torch.no_grad()
def revive(sae: VLSAE, optimizer: torch.optim.Optimizer, dead: Tensor, vision: Tensor,
           text: Tensor) -> Tensor:
    """Re-aim ``dead`` concepts at the worst-reconstructed of the pairs (``vision``, ``text``,
    as the SAE sees them) and clear their Adam moments; returns the revived ones, at most one
    per pair (a small batch revives the rest next time)."""
    residual = [x - reconstruct(sae, x, m) for x, m in ((vision, "vision"), (text, "text"))]
    error = residual[0].pow(2).sum(1) + residual[1].pow(2).sum(1)
    live = torch.ones(sae.h, dtype=torch.bool, device=vision.device)
    live[dead] = False
    dead = dead[:len(error)]
    worst = error.topk(len(dead)).indices
    # aim at the worst pair; decoder columns along its residuals at a fifth of the live
    # columns' norm, so that rows the new concept captures lose little (Anthropic's 0.2)
    for dec, res in zip((sae.vision_decoder, sae.text_decoder), residual):
        scale = 0.2 * dec.weight[:, live].norm(dim=0).mean() if live.any() else 1.0
        dec.weight[:, dead] = (F.normalize(res[worst], dim=1) * scale).T
    pair = F.normalize(vision[worst], dim=1) + F.normalize(text[worst], dim=1)
    norm = sae.concepts[live].norm(dim=1).mean() if live.any() else 1.0
    sae.concepts[dead] = F.normalize(pair, dim=1) * norm
    state = optimizer.state
    for param, index in ((sae.concepts, (dead,)), (sae.vision_decoder.weight, (slice(None),
                         dead)), (sae.text_decoder.weight, (slice(None), dead))):
        for buffer in ("exp_avg", "exp_avg_sq"):
            if buffer in state.get(param, {}):
                state[param][buffer][index] = 0
    return dead
