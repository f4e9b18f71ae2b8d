"""The held-out metrics of a trained space against a direct computation."""

from __future__ import annotations

import pytest
import torch
from helpers.activations import write_activations

from sae_training.metrics import evaluate
from sae_training.store import ActivationStore
from vlsae_hooks.spaces.autoencoder import VLSAE


def test_evaluate_equals_a_direct_computation_across_uneven_batches(tmp_path) -> None:
    write_activations(tmp_path / "acts", n=96, d=16)
    store = ActivationStore(tmp_path / "acts")
    torch.manual_seed(8)
    sae = VLSAE(16, 64, 4)
    rows = torch.arange(10, 90)
    vision, text = store.get(rows)
    with torch.no_grad():
        sae.vision_decoder.bias.copy_(vision.mean(0))
        sae.text_decoder.bias.copy_(text.mean(0))
        metrics = evaluate(sae, None, store, rows, batch_size=24)
        zv, zt = sae.encode(vision), sae.encode(text)
        recon = {"vision": sae.decode(zv, "vision"), "text": sae.decode(zt, "text")}
    for m, x in (("vision", vision), ("text", text)):
        x, r = x.double(), recon[m].double()
        ev = 1 - float((x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        assert metrics["explained_variance"][m] == pytest.approx(ev, abs=1e-5)
    av, at = zv > 0, zt > 0

    def jaccard(a, b):
        return ((a & b).sum(1) / (a | b).sum(1)).double()

    batches = [slice(s, s + 24) for s in range(0, 80, 24)]  # 24, 24, 24, 8
    shuffled = torch.cat([jaccard(av[s], at[s].roll(1, 0)) for s in batches])
    agreement = metrics["concept_agreement"]
    assert agreement["matched_jaccard"] == pytest.approx(float(jaccard(av, at).mean()))
    assert agreement["shuffled_jaccard"] == pytest.approx(float(shuffled.mean()))
    assert metrics["fired_fraction_val"] == pytest.approx(float((av | at).any(0).float().mean()))
    assert metrics["l0"] == pytest.approx(4) and metrics["n_val"] == 80


def test_held_out_rows_without_spread_give_nan_explained_variance_not_a_crash(tmp_path,
                                                                              caplog) -> None:
    """Held-out rows all alike (a tokenizer that reads every caption as one unknown word gives
    identical text rows) leave explained variance undefined: it was a ZeroDivisionError at the
    end of training, after the space was saved and before metrics.json was."""
    import math

    write_activations(tmp_path / "acts", n=8, d=16)
    store = ActivationStore(tmp_path / "acts")
    torch.manual_seed(8)
    with caplog.at_level("WARNING", logger="sae_training.metrics"):
        metrics = evaluate(VLSAE(16, 64, 4), None, store, torch.tensor([5, 5]), batch_size=24)
    assert all(math.isnan(metrics["explained_variance"][m]) for m in ("vision", "text"))
    assert "the held-out vision rows are all the same" in caplog.text
