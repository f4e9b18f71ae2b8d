"""How ``save_pretrained`` puts a space in place (each file staged inside the folder itself,
then renamed over the old, config.json last) and what a load hands back (in eval mode)."""

import os

import torch
from helpers.spaces import small_space

import vlsae_hooks.spaces.base as base
from vlsae_hooks import load_space

torch.set_num_threads(1)


def test_files_are_staged_inside_the_folder_and_renamed_config_last(tmp_path, monkeypatch):
    """Staged on the folder's own file system, a rename is atomic (across file systems it is a
    copy, or fails); the config, which makes a folder a space, last, so a first save cut short
    leaves a folder that is no space rather than a config without its weights."""
    space = small_space()
    space.recommended_steering = {"mode": "shift", "alpha": 1.0}
    folder = tmp_path / "space"
    moves, replace = [], os.replace

    def recording_replace(source, target):
        moves.append((os.path.dirname(os.path.dirname(source)), os.path.basename(target)))
        replace(source, target)

    monkeypatch.setattr(base.os, "replace", recording_replace)
    space.save_pretrained(folder)
    assert sorted(moves) == [(str(folder), "config.json"), (str(folder), "model.safetensors"),
                             (str(folder), "steering.json")]
    assert moves[-1][1] == "config.json"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors",
                                                        "steering.json"]


def test_a_space_saved_while_training_loads_in_eval_mode(tmp_path):
    space = small_space()
    assert space.training
    space.save_pretrained(tmp_path)
    loaded = load_space(tmp_path)
    assert not loaded.training and not any(m.training for m in loaded.modules())
