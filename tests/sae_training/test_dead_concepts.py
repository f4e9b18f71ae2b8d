"""Dead concepts: when a concept counts as dead, and how revival re-aims it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sae_training.dead_concepts import DeadConcepts, revive
from sae_training.losses import SAEObjective
from vlsae_hooks.spaces.autoencoder import VLSAE


def test_a_concept_is_dead_once_exactly_dead_after_rows_pass_without_it_firing() -> None:
    dead = DeadConcepts(4, dead_after=128, device=torch.device("cpu"))
    dead.record(torch.tensor([1.0, 0, 0, 0]), 64)
    assert not dead.mask().any()
    dead.record(torch.tensor([0, 1.0, 0, 0]), 64)
    assert dead.since_fired.tolist() == [64, 0, 128, 128]
    assert dead.mask().tolist() == [False, False, True, True]


def test_revive_aims_at_the_worst_pairs_scales_columns_and_clears_only_their_moments() -> None:
    torch.manual_seed(7)
    d, h = 8, 32
    sae = VLSAE(d, h, 4)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    vision, text = torch.randn(16, d), torch.randn(16, d)
    SAEObjective(sae, auxk_coef=0)(vision, text)["loss"].backward()
    optimizer.step()
    vision[5] *= 100  # pair 5 is the worst reconstructed, pair 9 the second worst
    text[9] *= 30
    dead = torch.tensor([2, 20])
    live = torch.ones(h, dtype=torch.bool)
    live[dead] = False
    with torch.no_grad():
        residual = {m: x - sae(x, m) for m, x in (("vision", vision), ("text", text))}
        concept_norm = sae.concepts[live].norm(dim=1).mean()
        column_norm = {m: sae.decoder(m).weight[:, live].norm(dim=0).mean() for m in residual}
        before = sae.concepts[live].clone()
    assert revive(sae, optimizer, dead, vision, text).tolist() == [2, 20]
    for concept, pair in ((2, 5), (20, 9)):
        aim = F.normalize(F.normalize(vision[pair], dim=0) + F.normalize(text[pair], dim=0),
                          dim=0)
        torch.testing.assert_close(sae.concepts[concept], aim * concept_norm)
        for m in residual:
            torch.testing.assert_close(sae.decoder(m).weight[:, concept],
                                       F.normalize(residual[m][pair], dim=0)
                                       * 0.2 * column_norm[m], rtol=1e-4, atol=1e-6)
    assert torch.equal(sae.concepts[live], before)
    for param, rows in ((sae.concepts, lambda t: t[dead]),
                        (sae.vision_decoder.weight, lambda t: t[:, dead]),
                        (sae.text_decoder.weight, lambda t: t[:, dead])):
        for buffer in ("exp_avg", "exp_avg_sq"):
            moments = optimizer.state[param][buffer]
            assert not rows(moments).any() and moments.abs().sum() > 0
