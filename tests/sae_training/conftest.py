"""Fixtures of the training tests, each built once per session: the tiny LLaVA with its
processor (in memory and saved), the synthetic activations and an uninterrupted training run
on them (the root conftest checks that no test changes them); and, once per module, the tiny
LexVLA and its text model."""

from pathlib import Path

import pytest
import torch
from helpers.activations import write_activations
from helpers.lexvla import save_text_model, tiny_config
from helpers.training import small_config

from sae_training import train as train_module
from sae_training.lexvla.model import LexVLA
from vlsae_hooks.testing import tiny_llava, tiny_processor


def _tiny_llava_with_processor():
    model = tiny_llava(d=128)  # 4 decoder layers, 32 px images -> 16 image tokens
    return model, tiny_processor(model)


@pytest.fixture(scope="session")
def llava():
    """``tiny_llava(d=128)`` and its processor (word-level tokenizer)."""
    return _tiny_llava_with_processor()


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory) -> Path:
    """The same model and processor saved as a llava-hf folder (saved from a copy of their own:
    saving writes to the model's config)."""
    folder = tmp_path_factory.mktemp("model")
    for part in _tiny_llava_with_processor():
        part.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def activations(tmp_path_factory) -> Path:
    """``write_activations``' default paired activations (512 pairs, 32 wide, 3 shards)."""
    folder = tmp_path_factory.mktemp("acts")
    write_activations(folder)
    return folder


@pytest.fixture(scope="session")
def straight(activations: Path, tmp_path_factory) -> Path:
    """An uninterrupted run of ``small_config`` on ``activations``: what every resumed run must
    end as."""
    out = tmp_path_factory.mktemp("straight")
    train_module.train(small_config(activations, out))
    return out


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory) -> Path:
    """``save_text_model``'s tiny word-level Llama folder."""
    return save_text_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def model(text_model_dir: Path) -> LexVLA:
    """The tiny LexVLA (``tiny_config``) over that text model, in eval mode."""
    torch.manual_seed(0)
    return LexVLA.build(tiny_config(text_model_dir)).eval()
