"""The toy world's patch readouts for mode grounding: the fit command on a handful of scenes, the
targets it fits on, the shipped readouts, and the methods that steer with them."""

import json

import pytest
import torch
from helpers.spies import record_calls, record_results

from eval_suites.toyworld.__main__ import main
from eval_suites.toyworld.assets_paths import TOY_DIR
from eval_suites.toyworld.grounding import (
    CAPTIONS_FOLDER,
    HELDOUT_SEED,
    UNIT_NAMES,
    box_targets,
    caption_targets,
)
from eval_suites.toyworld.world import STREAM_PAIRS, make_scene
from vlsae_hooks import PatchReadout

LLAVA = TOY_DIR / "llava"
METHODS = ("vlsae-grounding", "vlsae-grounding-novision", "vlsae-grounding-wrongimage",
           "vlsae-grounding-captions", "vlsae-grounding-captions-wrongimage")


def test_targets_name_each_shown_class_by_its_colour_and_shape():
    scene = make_scene(0, STREAM_PAIRS, 3)
    names = {UNIT_NAMES.index(word) for c in scene.scene.names for word in c.split()}
    bags = caption_targets([scene])
    assert set(bags[0].nonzero()[:, 0].tolist()) == names
    patches = box_targets([scene], grid=8, min_cover=0.25)
    assert patches.shape == (1, 64, 20)
    assert set(patches[0].amax(0).nonzero()[:, 0].tolist()) <= names
    assert 0 < patches[0].any(1).sum() < 64  # some patches show something, not all


def test_the_fit_command_writes_both_readouts_with_their_reports(tmp_path, capsys):
    main(["grounding", "--out", str(tmp_path), "--n-train", "60", "--n-heldout", "12",
          "--steps", "3"])
    printed = json.loads(capsys.readouterr().out)
    for supervision, folder in (("boxes", tmp_path / "vlsae_space"),
                                ("captions", tmp_path / CAPTIONS_FOLDER)):
        readout = PatchReadout.load(folder)
        assert (readout.supervision, readout.layer, readout.n_units, readout.d) == \
            (supervision, 0, 20, 256)
        assert readout.is_attribute.tolist() == [True] * 10 + [False] * 10
        report = json.loads((folder / "patch_readout.json").read_text())
        assert report["config"]["steps"] == 3 and report["heldout"]["seed"] == 1
        assert report["heldout"] == printed[supervision]
    shipped = PatchReadout.load(LLAVA / "vlsae_space")
    assert torch.equal(readout.unit_token_ids, shipped.unit_token_ids)  # the same tokenizer


def test_the_shipped_readouts_and_their_reports():
    for supervision, folder in (("boxes", LLAVA / "vlsae_space"),
                                ("captions", LLAVA / CAPTIONS_FOLDER)):
        readout = PatchReadout.load(folder)
        assert readout.supervision == supervision and readout.layer == 0
        report = json.loads((folder / "patch_readout.json").read_text())
        assert report["config"]["steps"] == 400
        assert "i < 3000" in report["fitted_on"]
        assert report["heldout"]["image_auc"] > 0.9


def test_grounding_methods_are_listed_and_decode(shipped_toy_llava):
    from eval_suites.core.methods import METHODS as REGISTERED
    from eval_suites.toyworld.methods import toy_methods

    assert set(METHODS) <= set(toy_methods())
    model, processor = shipped_toy_llava
    images = [make_scene(1, STREAM_PAIRS, i).image for i in range(2)]
    for name in ("vlsae-grounding", "vlsae-grounding-captions-wrongimage"):
        with REGISTERED[name](model, processor) as decoder:
            answers = decoder.generate(images, ["Describe the image."] * 2, max_new_tokens=6)
        assert len(answers) == 2 and all(n > 0 for _, n in answers)


def test_patch_codes_are_the_spaces_dense_codes_of_each_patch():
    from eval_suites.toyworld.grounding_probe import patch_codes
    from vlsae_hooks.spaces import load_space

    space = load_space(LLAVA / "vlsae_space")
    states = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(0))
    codes = patch_codes(space, states, chunk=2)
    assert codes.shape == (3, 5, 2048)
    torch.testing.assert_close(codes, space.encode(states, "vision"), atol=1e-6, rtol=0)
    assert ((codes != 0).sum(-1) == space.config.k).all()


def test_the_probe_command_scores_raw_states_and_codes_on_the_same_scenes(tmp_path, capsys,
                                                                          monkeypatch):
    import eval_suites.toyworld.grounding_probe as probe
    from vlsae_hooks.spaces import load_space

    calls = record_results(monkeypatch, probe, "fit_patch_readout", "heldout_report")
    main(["grounding-probe", "--json", str(tmp_path / "probe.json"), "--n-train", "40",
          "--n-heldout", "12", "--steps", "3"])
    result = json.loads((tmp_path / "probe.json").read_text())
    assert list(result["features"]) == ["raw states, layer 0", "raw states, layer 3",
                                        "space codes, layer 3"]
    fits, reports = ([(args, made) for called, args, made in calls if called == name]
                     for name in ("fit_patch_readout", "heldout_report"))
    assert [args[4] for args, _ in fits] == [0, 3, 3]  # the layer each feature is read at
    # fitted on the 40 training scenes' states, scored on the 12 held-out scenes' with the
    # readout fitted on their feature; the codes are the space's of the layer-3 states
    assert [len(args[0]) for args, _ in fits] == [40] * 3
    assert [(len(args[1]), len(args[2])) for args, _ in reports] == [(12, 12)] * 3
    assert [args[0] for args, _ in reports] == [readout for _, readout in fits]
    space = load_space(LLAVA / "vlsae_space")
    for step in (fits, reports):
        raw, codes = step[1][0][step is reports], step[2][0][step is reports]
        torch.testing.assert_close(codes, space.encode(raw.float(), "vision"), atol=1e-6, rtol=0)
    for (name, scores), (_, report) in zip(result["features"].items(), reports):
        assert scores == {"patch_auc": report["patch_auc"], "image_auc": report["image_auc"],
                          **report["class_separations"]}, name
    assert result["n_train"] == 40 and result["config"]["steps"] == 3
    assert result["heldout"] == {"seed": HELDOUT_SEED, "n_images": 12}
    for scores in result["features"].values():
        assert all(0 <= value <= 1 for value in scores.values())
    table = (tmp_path / "probe.md").read_text()
    assert table in capsys.readouterr().out and table.count("\n") == 5
    assert len(set(json.dumps(s) for s in result["features"].values())) == 3  # three fits


def test_the_probe_needs_the_models_own_space(tmp_path, capsys):
    from vlsae_hooks.testing import tiny_llava, tiny_processor

    model = tiny_llava()
    model.save_pretrained(tmp_path / "bare")
    tiny_processor(model).save_pretrained(tmp_path / "bare")
    with pytest.raises(SystemExit):
        main(["grounding-probe", "--model", str(tmp_path / "bare"), "--json",
              str(tmp_path / "p.json"), "--n-train", "4", "--n-heldout", "2", "--steps", "1"])
    assert "with its vlsae_space" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # its table, beside it, would overwrite it
        main(["grounding-probe", "--json", str(tmp_path / "probe.md")])
    assert exit_info.value.code == 2 and "give the result a .json name" in capsys.readouterr().err


def test_the_readouts_fit_on_training_pairs_and_report_on_the_dev_seed(shipped_toy_llava,
                                                                       monkeypatch):
    """The rule every fitted piece keeps: fitted on training-distribution pairs (seed 0, the
    pairs stream), measured on the held-out scenes of the dev seed, never the test seeds."""
    import eval_suites.toyworld.grounding as grounding
    from eval_suites.toyworld.world import STREAM_PAIRS

    drawn = record_calls(monkeypatch, grounding, "make_scene", "heldout_scenes")
    fit = grounding.FitScenes.make(*shipped_toy_llava, n_train=5, n_heldout=3)
    assert drawn == [*(("make_scene", (0, STREAM_PAIRS, i)) for i in range(5)),
                     ("heldout_scenes", (HELDOUT_SEED, 3))]
    assert HELDOUT_SEED == 1 and (len(fit.train), len(fit.heldout)) == (5, 3)
