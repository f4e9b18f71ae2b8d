"""Offline, our loaders load a model without the Hub's kernels unless the caller or
``USE_HUB_KERNELS`` chose (transformers 5.2x kernelizes by default and, on a GPU, fails offline
when the kernels are not cached)."""

import pytest
from huggingface_hub import constants

from sae_training.extractors import load_model
from sae_training.hub_kernels import offline_kernels


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)


def test_online_the_arguments_are_left_alone(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    kwargs = {"dtype": "float32"}
    assert offline_kernels(kwargs) is kwargs


def test_offline_kernels_are_turned_off_in_a_copy(offline):
    kwargs = {"dtype": "float32"}
    assert offline_kernels(kwargs) == {"dtype": "float32", "use_kernels": False}
    assert kwargs == {"dtype": "float32"}


@pytest.mark.parametrize("choice", [True, False])
def test_offline_the_callers_choice_stands(offline, choice):
    assert offline_kernels({"use_kernels": choice}) == {"use_kernels": choice}


def test_offline_the_environments_choice_stands(offline, monkeypatch):
    monkeypatch.setenv("USE_HUB_KERNELS", "1")
    assert offline_kernels({}) == {}


def test_load_model_offline_loads_without_kernels(offline, llava_dir):
    model, _ = load_model(str(llava_dir))
    assert model.use_kernels is False
