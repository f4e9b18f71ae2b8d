"""Finding a model's default concept space: registered names, then a vlsae_space/ folder."""

import torch
from transformers import LlavaForConditionalGeneration

from vlsae_hooks import attach, find_space, register_space
from vlsae_hooks.registry import _REGISTERED
from vlsae_hooks.testing import random_space, tiny_llava

torch.set_num_threads(1)


def test_registered_name_wins(tmp_path):
    model = tiny_llava()
    model.config._name_or_path = "org/registered-llava"
    assert find_space(model) is None
    register_space("org/registered-llava", tmp_path / "space")
    try:
        assert find_space(model) == tmp_path / "space"
    finally:
        _REGISTERED.pop("org/registered-llava")


def test_space_shipped_inside_the_model_folder(tmp_path):
    model = tiny_llava()
    model.save_pretrained(tmp_path)
    space = random_space(model)
    space.config.model_name = str(tmp_path)
    space.save_pretrained(tmp_path / "vlsae_space")
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert find_space(loaded) == tmp_path / "vlsae_space"
    with attach(loaded) as handle:  # no space argument: found beside the weights
        assert handle.space.config == space.config
