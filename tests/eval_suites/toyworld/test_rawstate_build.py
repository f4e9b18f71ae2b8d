"""How the raw-state ablation is built, with its slow steps (export, extraction, fits) recorded
instead of run, on a copy of the toy LLaVA: what each step is given, where the space goes, the
cache key, the staging folder, and a build that another process finished first."""

import json
import os
import shutil

import pytest
import torch

from eval_suites.toyworld import rawstate
from eval_suites.toyworld.assets_paths import TOY_DIR
from eval_suites.toyworld.spaces import ToySpaceRecipe
from vlsae_hooks.registry import SPACE_SUBFOLDER
from vlsae_hooks.spaces import STEERING_NAME, VLSAESpace

RECIPE = ToySpaceRecipe(n_pairs=100, seed=7)
EXPLAINED = {"vision": 0.5, "text": 0.25}


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    """A copy of the toy LLaVA (its space included) and an empty ablation cache."""
    monkeypatch.setenv("VLSAE_CACHE", str(tmp_path / "cache"))
    shutil.copytree(TOY_DIR / "llava", tmp_path / "llava")
    return tmp_path / "llava"


@pytest.fixture
def steps(monkeypatch):
    """The build's slow steps, each noted with what it was given (and, for the extraction,
    which files the model folder it reads held)."""
    calls = {}

    def export(folder, **kwargs):
        calls["export"] = (folder, kwargs)

    def extract(config):
        calls["extract"] = (config, sorted(os.listdir(config.model)))

    def fit(space, store):
        calls["fit"] = (space, store)
        return dict(EXPLAINED)

    def readout(model, work, recipe):
        saved = (model / SPACE_SUBFOLDER / "config.json").is_file()
        calls["readout"] = (model, work, recipe, saved)

    monkeypatch.setattr(rawstate, "export_training_pairs", export)
    monkeypatch.setattr(rawstate, "run_extract", extract)
    monkeypatch.setattr(rawstate, "ActivationStore", lambda folder: ("store", folder))
    monkeypatch.setattr(rawstate, "fit_decoders", fit)
    monkeypatch.setattr(rawstate, "fit_toy_readout", readout)
    return calls


def test_cache_root_is_the_env_folder_else_runs(monkeypatch):
    monkeypatch.setenv("VLSAE_CACHE", "/somewhere")
    assert rawstate.cache_root() == rawstate.Path("/somewhere/rawstate_space")
    monkeypatch.delenv("VLSAE_CACHE")
    assert rawstate.cache_root() == rawstate.Path("runs/rawstate_space")


def test_space_dir_changes_with_the_recipe_the_seed_the_ridge_and_the_shipped_weights(
        model_dir, monkeypatch):
    shipped = model_dir / SPACE_SUBFOLDER
    folder = rawstate.space_dir(model_dir, shipped, RECIPE)
    assert folder.parent == rawstate.cache_root() and folder.name.startswith("llava-")
    assert rawstate.space_dir(model_dir, shipped, ToySpaceRecipe(n_pairs=100, seed=7)) == folder
    others = {rawstate.space_dir(model_dir, shipped, ToySpaceRecipe(n_pairs=101, seed=7)),
              rawstate.space_dir(model_dir, shipped, RECIPE, seed=1)}
    with monkeypatch.context() as patch:  # decoders fitted with another ridge
        patch.setattr(rawstate, "RIDGE", rawstate.RIDGE * 10)
        others.add(rawstate.space_dir(model_dir, shipped, RECIPE))
    weights = shipped / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")  # retrained weights, same folder
    others.add(rawstate.space_dir(model_dir, shipped, RECIPE))
    assert folder not in others and len(others) == 4


def test_build_hands_each_step_the_recipe_and_the_spaces_place(model_dir, steps):
    shipped = model_dir / SPACE_SUBFOLDER
    like = VLSAESpace.from_pretrained(shipped, load_readout=False)
    target = rawstate.build_rawstate_space(model_dir, shipped, RECIPE)
    assert target == rawstate.space_dir(model_dir, shipped, RECIPE)
    pairs, kwargs = steps["export"]
    assert kwargs == {"seed": RECIPE.seed, "n_pairs": RECIPE.n_pairs}
    config, listed = steps["extract"]
    assert (config.site, config.layer) == (like.config.site, like.config.layer)
    assert config.data == str(pairs) and config.out == str(pairs.with_name("acts"))
    # the model's own files, linked, without its space (the ablation is saved there)
    assert SPACE_SUBFOLDER not in listed
    assert set(listed) == {p.name for p in model_dir.iterdir()} - {SPACE_SUBFOLDER}
    space, store = steps["fit"]
    assert store == ("store", pairs.with_name("acts"))
    assert torch.equal(space.sae.concepts, rawstate.random_projection_space(like).sae.concepts)
    model, work, recipe, saved_first = steps["readout"]
    assert (model.name, work, recipe, saved_first) == ("model", pairs.parent, RECIPE, True)
    built = VLSAESpace.from_pretrained(target, load_readout=False)
    record = built.config.extra["rawstate"]
    assert record["seed"] == rawstate.SEED and record["decoder_val_explained_variance"] == EXPLAINED
    assert record["of_space"] == str(shipped) and record["recipe"]["seed"] == 7
    assert json.loads((target / STEERING_NAME).read_text()) == like.recommended_steering
    assert not list(target.parent.glob(".building-*"))  # the stage is gone
    assert "built" in target.with_name(target.name + ".log").read_text()
    shipped_files = {p.name: p.read_bytes() for p in shipped.iterdir()}
    assert shipped_files == {p.name: p.read_bytes() for p in (TOY_DIR / "llava" /
                                                               SPACE_SUBFOLDER).iterdir()}


def test_a_space_with_no_recommendation_gives_an_ablation_with_none(model_dir, steps):
    shipped = model_dir / SPACE_SUBFOLDER
    (shipped / STEERING_NAME).unlink()
    target = rawstate.build_rawstate_space(model_dir, shipped, RECIPE)
    assert not (target / STEERING_NAME).exists()
    assert VLSAESpace.from_pretrained(target, load_readout=False).recommended_steering == {}


def test_a_build_another_process_finished_first_is_taken(model_dir, steps, monkeypatch):
    shipped = model_dir / SPACE_SUBFOLDER
    target = rawstate.space_dir(model_dir, shipped, RECIPE)
    rename = os.rename

    def raced(source, destination):
        if destination == target:  # the other build lands first
            shutil.copytree(source, target)
        return rename(source, destination)

    monkeypatch.setattr(os, "rename", raced)
    assert rawstate.build_rawstate_space(model_dir, shipped, RECIPE) == target
    assert (target / "config.json").is_file()
    assert not list(target.parent.glob(".building-*"))


def test_a_failed_rename_is_raised_and_the_stage_removed(model_dir, steps, monkeypatch):
    shipped = model_dir / SPACE_SUBFOLDER
    target = rawstate.space_dir(model_dir, shipped, RECIPE)

    def refused(source, destination):
        raise PermissionError(f"cannot write {destination}")

    monkeypatch.setattr(os, "rename", refused)
    with pytest.raises(PermissionError, match="cannot write"):
        rawstate.build_rawstate_space(model_dir, shipped, RECIPE)
    assert not target.exists() and not list(target.parent.glob(".building-*"))


def test_a_model_that_is_no_folder_here_is_refused_before_any_step(model_dir, steps):
    """A model loaded by hub id whose space is registered: nothing to extract states with."""
    with pytest.raises(ValueError, match="extracts the model's states from the files of its "
                                         "folder, and 'org/llava' is not a folder here"):
        rawstate.build_rawstate_space(rawstate.Path("org/llava"), model_dir / SPACE_SUBFOLDER,
                                      RECIPE)
    assert steps == {}
    assert not (model_dir.parent / "cache").exists()
