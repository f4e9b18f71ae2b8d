"""The toy world's patch readouts for mode grounding: the fit command on a handful of scenes, the
targets it fits on, the shipped readouts, and the methods that steer with them."""

import json

import torch

from eval_suites.toyworld.__main__ import main
from eval_suites.toyworld.assets_paths import TOY_DIR
from eval_suites.toyworld.grounding import CAPTIONS_FOLDER, UNIT_NAMES, box_targets, caption_targets
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
