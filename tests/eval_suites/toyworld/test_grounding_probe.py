"""The grounding probe's plumbing with the fits stubbed: which space it reads and which it
refuses, the patch cover each step is given, the codes of states in any precision, and its
table."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import eval_suites.toyworld.grounding_probe as probe
from eval_suites.toyworld.assets_paths import TOY_DIR
from sae_training.patch_readout import PatchReadoutConfig
from vlsae_hooks.spaces import load_space

SPACE = TOY_DIR / "llava" / "vlsae_space"


def test_patch_codes_read_states_of_any_precision_as_float32():
    space = load_space(SPACE)
    states = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(0)).half()
    codes = probe.patch_codes(space, states)
    assert codes.dtype == torch.float32
    torch.testing.assert_close(codes, space.encode(states.float(), "vision"), atol=1e-6, rtol=0)


def _stub_fit(monkeypatch, space_folder, calls):
    monkeypatch.setattr(probe, "load_model", lambda path: calls.append(("model", path)) or
                        ("M", "P"))
    monkeypatch.setattr(probe, "find_space", lambda model: space_folder)

    def states(layer, batch_size):
        calls.append(("states", layer, batch_size))
        g = torch.Generator().manual_seed(layer)
        return torch.randn(4, 3, 256, generator=g), torch.randn(2, 3, 256, generator=g)

    fit = SimpleNamespace(train=["t"] * 4, heldout=["h"] * 2, grid=2, token_ids="ids",
                          states=states)
    monkeypatch.setattr(probe.FitScenes, "make", lambda *args: calls.append(("make", *args))
                        or fit)
    monkeypatch.setattr(probe, "box_targets", lambda scenes, grid, cover: calls.append(
        ("targets", len(scenes), grid, cover)) or "targets")
    monkeypatch.setattr(probe, "fit_patch_readout", lambda feats, *args: calls.append(
        ("fit", feats, *args)) or len(calls))
    scores = iter(range(100))

    def report(readout, feats, heldout, grid, cover):
        calls.append(("report", readout, feats, len(heldout), grid, cover))
        separations = {key: next(scores) / 100 for key, _ in probe.COLUMNS[2:]}
        return {"patch_auc": next(scores) / 100, "image_auc": next(scores) / 100,
                "class_separations": separations}

    monkeypatch.setattr(probe, "heldout_report", report)


def test_the_probe_fits_and_scores_each_feature_with_the_config_given(monkeypatch):
    calls = []
    _stub_fit(monkeypatch, SPACE, calls)
    cfg = PatchReadoutConfig(min_cover=0.4, steps=2)
    result = probe.probe_patch_features("some/llava", n_train=4, n_heldout=2, cfg=cfg,
                                        batch_size=7)
    space = load_space(SPACE).float()
    assert calls[:3] == [("model", "some/llava"), ("make", "M", "P", 4, 2),
                         ("targets", 4, 2, 0.4)]
    fits = [c for c in calls if c[0] == "fit"]
    reports = [c for c in calls if c[0] == "report"]
    assert [c[1:2] for c in calls if c[0] == "states"] == [(0,), (3,)]
    assert [f[2:] for f in fits] == [("targets", "ids", probe.IS_ATTRIBUTE, layer, cfg)
                                     for layer in (0, 3, 3)]
    assert [r[3:] for r in reports] == [(2, 2, 0.4)] * 3
    made = [1 + next(i for i, c in enumerate(calls) if c is f) for f in fits]
    assert [r[1] for r in reports] == made  # each feature scored with its own readout
    train3 = torch.randn(4, 3, 256, generator=torch.Generator().manual_seed(3))  # states(3)
    torch.testing.assert_close(fits[1][1], train3)
    torch.testing.assert_close(fits[2][1], space.encode(train3, "vision"), atol=1e-6, rtol=0)
    held3 = reports[1][2]
    torch.testing.assert_close(reports[2][2], space.encode(held3, "vision"), atol=1e-6, rtol=0)
    assert result["features"]["raw states, layer 0"] == {
        "patch_auc": 0.03, "image_auc": 0.04, "present_vs_absent_partner": 0.0,
        "absent_partner_vs_other_absent": 0.01, "present_vs_absent_same_colour": 0.02}
    assert result["model"] == "some/llava" and result["n_train"] == 4
    assert result["heldout"] == {"seed": 1, "n_images": 2} and result["config"]["steps"] == 2
    assert result["space"] == "eval_suites/toyworld/assets/llava/vlsae_space"


@pytest.mark.parametrize(("kind", "site"), [("lexvla", "layer_3"), ("vlsae", "vision_out")])
def test_the_probe_refuses_a_space_not_of_decoder_layer_states(monkeypatch, kind, site):
    calls = []
    _stub_fit(monkeypatch, "the/space", calls)
    fake = SimpleNamespace(config=SimpleNamespace(kind=kind, site=site))
    fake.float = fake.eval = lambda: fake
    monkeypatch.setattr(probe, "load_space", lambda folder: fake)
    with pytest.raises(ValueError, match=f"the/space is a {kind} space at {site}; the probe "
                                         "needs a VL-SAE of decoder-layer states"):
        probe.probe_patch_features(n_train=4, n_heldout=2)
    assert calls == [("model", None)]


def test_the_probe_table_has_a_row_per_feature_and_three_decimals():
    scores = {key: i / 7 for i, (key, _) in enumerate(probe.COLUMNS)}
    table = probe.probe_table({"features": {"raw": scores, "codes": scores}})
    assert table.splitlines() == [
        "| features the box readout reads | patch AUC | image AUC | present vs absent partner "
        "| absent partner vs other absent | present vs absent of a shown colour |",
        "|---|---|---|---|---|---|",
        "| raw | 0.000 | 0.143 | 0.286 | 0.429 | 0.571 |",
        "| codes | 0.000 | 0.143 | 0.286 | 0.429 | 0.571 |"]
