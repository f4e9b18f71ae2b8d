"""The toy space's readouts are fitted on the distribution the toy LLaVA was trained on, the
oracle recipe is only an opt-in upper bound, and the shipped recommendation does not push "yes"
blind to the question's form."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

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


def test_the_recipe_is_the_one_that_trained_the_shipped_spaces():
    recipe = ToySpaceRecipe()
    for model, sae, aligner in (("llava", recipe.llava_sae, recipe.llava_aligner),
                                ("clip", recipe.clip_sae, None)):
        config = json.loads((TOY_DIR / model / "vlsae_space" / "config.json").read_text())
        training = config["extra"]["training"]
        assert training["sae"] == asdict(sae), model
        assert training["use_aligner"] == (aligner is not None), model
        assert config["extra"]["data"]["count"] == recipe.n_pairs
        assert config["model_name"] == f"vlsae-toy/{model}"  # not the training machine's path
    assert training_of("llava")["aligner"] == asdict(recipe.llava_aligner)
    assert recipe.readout_data() == json.loads((SPACE / "config.json").read_text())[
        "extra"]["readout_data"]


def training_of(model: str) -> dict:
    config = json.loads((TOY_DIR / model / "vlsae_space" / "config.json").read_text())
    return config["extra"]["training"]


def test_readout_data_is_recorded_beside_what_the_files_held(tmp_path):
    from eval_suites.toyworld.spaces import record_readout_data

    (tmp_path / "config.json").write_text(json.dumps({"k": 4, "extra": {"training": 1}}))
    for name in ("word_readout.json", "phrase_readout.json"):
        (tmp_path / name).write_text(json.dumps({FINGERPRINT: name}))
    data = ToySpaceRecipe(n_pairs=10, seed=3).readout_data()
    record_readout_data(tmp_path, data)
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "k": 4, "extra": {"training": 1, "readout_data": data}}
    for name in ("word_readout.json", "phrase_readout.json"):
        assert json.loads((tmp_path / name).read_text()) == {FINGERPRINT: name,
                                                             "readout_data": data}
    assert data == {"world": asdict(ToyTrainConfig().world), "n_pairs": 10, "seed": 3,
                    "training_world": True, "oracle": False}


def test_recording_readout_data_rewrites_each_file_whole(tmp_path, monkeypatch):
    """Each file is replaced by a whole new one: a kill just before the swap leaves the space's
    config (its weights' only description) as it was, not half written."""
    import os

    from eval_suites.toyworld.spaces import record_readout_data

    config = json.dumps({"k": 4})
    (tmp_path / "config.json").write_text(config)
    replace = os.replace

    def killed(source, target) -> None:
        assert (tmp_path / "config.json").read_text() == config  # not touched in place
        assert json.loads(Path(source).read_text())["extra"]["readout_data"] == {"n_pairs": 1}
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        record_readout_data(tmp_path, {"n_pairs": 1})
    monkeypatch.setattr(os, "replace", replace)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary left
    assert (tmp_path / "config.json").read_text() == config


def test_oracle_readouts_need_the_oracle_recipe(tmp_path):
    from eval_suites.toyworld.spaces import fit_oracle_readout

    with pytest.raises(ValueError, match=r"takes an oracle recipe \(ToySpaceRecipe.oracle\(\)\)"):
        fit_oracle_readout(tmp_path, tmp_path, ToySpaceRecipe())
    assert list(tmp_path.iterdir()) == []


def tiny_recipe(**overrides) -> ToySpaceRecipe:
    """The recipe at a scale a test can train (distinct k's tell the two spaces apart)."""
    from sae_training.config import AlignerConfig, SAEConfig

    sae = dict(expansion=2, epochs=1, batch_size=64, lr=1e-3, warmup_epochs=0)
    return ToySpaceRecipe(n_pairs=100, llava_sae=SAEConfig(k=4, **sae),
                          clip_sae=SAEConfig(k=2, **sae),
                          llava_aligner=AlignerConfig(epochs=1, batch_size=64), **overrides)


@pytest.fixture(scope="module")
def tiny_spaces(tmp_path_factory):
    """``train_toy_spaces`` then ``fit_oracle_readout`` at tiny scale, on copies of the toy
    models whose LLaVA still holds the shipped space (trained over, as a rerun does)."""
    from eval_suites.toyworld.spaces import fit_oracle_readout, train_toy_spaces

    root = tmp_path_factory.mktemp("toy")
    shutil.copytree(TOY_DIR / "clip", root / "clip", ignore=shutil.ignore_patterns("vlsae_*"))
    shutil.copytree(TOY_DIR / "llava", root / "llava",
                    ignore=shutil.ignore_patterns(ORACLE_READOUT_FOLDER, "patch_readout_*"))
    metrics = train_toy_spaces(root, root / "work", tiny_recipe())
    readouts = {name: (root / "llava" / "vlsae_space" / name).read_bytes()
                for name in ("word_readout.safetensors", "phrase_readout.json")}
    oracle = fit_oracle_readout(root / "llava", root / "work", ToySpaceRecipe.oracle(n_pairs=100))
    return root, metrics, readouts, oracle


def test_toy_spaces_are_trained_by_the_recipe_into_the_models_folders(tiny_spaces):
    root, metrics, _, _ = tiny_spaces
    recipe = tiny_recipe()
    for model, sae, aligned in (("llava", recipe.llava_sae, True),
                                ("clip", recipe.clip_sae, False)):
        space = root / model / "vlsae_space"
        config = json.loads((space / "config.json").read_text())
        assert config["model_name"] == f"vlsae-toy/{model}" and config["k"] == sae.k
        assert config["extra"]["training"]["sae"] == asdict(sae)
        assert config["has_aligner"] is aligned and ("aligner" in metrics[model]) is aligned
        saved = json.loads((space / "metrics.json").read_text())
        assert saved == {k: v for k, v in metrics[model].items() if k != "readouts"}
    assert set(metrics["llava"]["readouts"]) == {"words", "phrases"}
    assert sorted(p.name for p in (root / "llava" / "vlsae_space").iterdir()) == sorted(
        ["config.json", "metrics.json", "model.safetensors", "word_readout.json",
         "word_readout.safetensors", "phrase_readout.json", "phrase_readout.safetensors"])
    space = root / "llava" / "vlsae_space"
    data = json.loads((space / "config.json").read_text())["extra"]["readout_data"]
    assert data == recipe.readout_data()
    for name in ("word_readout.json", "phrase_readout.json"):
        info = json.loads((space / name).read_text())
        assert info["readout_data"] == data and info[FINGERPRINT] == space_fingerprint(space)
        assert not Path(info["config"]["space"]).is_absolute()  # not this machine's path


def test_oracle_readouts_go_beside_the_space_and_leave_its_own_alone(tiny_spaces):
    from eval_suites.toyworld.spaces import READOUT_FILES

    root, _, readouts, oracle = tiny_spaces
    space, folder = root / "llava" / "vlsae_space", root / "llava" / ORACLE_READOUT_FOLDER
    assert set(oracle) == {"words", "phrases"}
    assert sorted(p.name for p in folder.iterdir()) == sorted(READOUT_FILES)
    for name in ("word_readout.json", "phrase_readout.json"):
        info = json.loads((folder / name).read_text())
        assert info["readout_data"]["oracle"] is True
        assert info[FINGERPRINT] == space_fingerprint(space)
    assert {name: (space / name).read_bytes() for name in readouts} == readouts
    assert not json.loads((space / "config.json").read_text())["extra"]["readout_data"]["oracle"]
