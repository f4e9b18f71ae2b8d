"""The toy space's readouts are fitted on the distribution the toy LLaVA was trained on, the
oracle recipe is only an opt-in upper bound, and the shipped recommendation does not push "yes"
blind to the question's form."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import pytest

from eval_suites.toyworld.assets_paths import TOY_DIR
from eval_suites.toyworld.spaces import (
    ORACLE_READOUT_FOLDER,
    TOY_STEERING,
    ToySpaceRecipe,
)
from eval_suites.toyworld.train import ToyTrainConfig
from eval_suites.toyworld.world import WorldConfig
from vlsae_hooks.word_evidence import FINGERPRINT, space_fingerprint

SPACE = TOY_DIR / "llava" / "vlsae_space"
ORACLE = TOY_DIR / "llava" / ORACLE_READOUT_FOLDER


def training_world() -> dict:
    """The world the shipped toy LLaVA was trained on, as its training run recorded it."""
    return json.loads((TOY_DIR / "train_summary.json").read_text())["config"]["world"]


def test_default_readout_world_is_the_training_world():
    recipe = ToySpaceRecipe()
    assert recipe.readout_world == ToyTrainConfig().world
    assert asdict(recipe.readout_world) == training_world()
    assert recipe.readout_world.pair_prob > 0 and recipe.readout_world.hidden_prob > 0
    assert not recipe.oracle_readout_data
    assert recipe.readout_data()["training_world"] is True


def test_oracle_recipe_is_explicit_and_labelled():
    oracle = ToySpaceRecipe.oracle()
    assert oracle.oracle_readout_data
    assert oracle.readout_world == WorldConfig(pair_prob=0.0, hidden_prob=0.0)
    info = oracle.readout_data()
    assert info["oracle"] is True and info["training_world"] is False


def test_shipped_space_records_training_distribution_readout_data():
    config = json.loads((SPACE / "config.json").read_text())
    data = config["extra"]["readout_data"]
    assert data["world"] == training_world()
    assert data["oracle"] is False and data["training_world"] is True
    assert data["n_pairs"] >= 1000
    fingerprint = space_fingerprint(SPACE)
    for name in ("word_readout.json", "phrase_readout.json"):
        info = json.loads((SPACE / name).read_text())
        assert info["readout_data"] == data
        assert info[FINGERPRINT] == fingerprint


def test_shipped_recommendation_does_not_affirm():
    path = SPACE / "steering.json"
    steering = json.loads(path.read_text()) if path.is_file() else {}
    assert not steering.get("affirm", 0.0)
    assert not TOY_STEERING.get("affirm", 0.0)


def test_oracle_method_registered_with_matching_readouts():
    from eval_suites.core.methods import METHODS
    from eval_suites.toyworld.methods import toy_methods
    from eval_suites.toyworld.oracle_methods import ORACLE_STEERING, oracle_space

    toy_methods()
    for name in ("vlsae-oracle-data", "vlsae-oracle-data-novision", "vlsae-oracle-data-wrongimage"):
        assert name in METHODS
    fingerprint = space_fingerprint(SPACE)
    for name in ("word_readout.json", "phrase_readout.json"):
        info = json.loads((ORACLE / name).read_text())
        assert info[FINGERPRINT] == fingerprint
        assert info["readout_data"]["oracle"] is True
    space = oracle_space(SPACE)
    assert space.word_readout is not None and space.phrase_readout is not None
    assert space.recommended_steering == {}
    assert ORACLE_STEERING["affirm"] > 0  # the old recipe, kept as it was for the upper bound


def test_oracle_readouts_of_other_weights_are_refused(tmp_path):
    from eval_suites.toyworld.oracle_methods import oracle_space

    shutil.copytree(SPACE, tmp_path / "vlsae_space")
    shutil.copytree(ORACLE, tmp_path / ORACLE_READOUT_FOLDER)
    info_path = tmp_path / ORACLE_READOUT_FOLDER / "word_readout.json"
    info = json.loads(info_path.read_text())
    info[FINGERPRINT] = "0" * 64
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="other weights"):
        oracle_space(tmp_path / "vlsae_space")


def test_oracle_method_decodes_on_the_toy_model(shipped_toy_llava):
    from eval_suites.core.methods import METHODS
    from eval_suites.toyworld.methods import toy_methods
    from eval_suites.toyworld.world import STREAM_TRAIN, make_scene

    toy_methods()
    model, processor = shipped_toy_llava
    image = make_scene(1, STREAM_TRAIN, 0, WorldConfig()).image
    with METHODS["vlsae-oracle-data"](model, processor) as decoder:
        texts = decoder.generate([image], ["Describe the image."], max_new_tokens=8)
    assert len(texts) == 1 and isinstance(texts[0][0], str) and texts[0][0]
