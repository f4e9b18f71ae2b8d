"""Fixtures of the evaluation tests, each built once per session: the random-weight toy LLaVA
(in memory and saved), the shipped toy LLaVA, and the protocol commands' exported data and
narrow model folder. The root conftest checks that no test changes them."""

from pathlib import Path

import pytest
import torch
from helpers.toy_llava import random_toy_llava, save_random_toy_llava

from eval_suites.toyworld.build import build_llava_processor, build_tokenizer, llava_config
from eval_suites.toyworld.evaluate import load_model
from eval_suites.toyworld.export import export_heldout


@pytest.fixture(scope="session")
def toy_llava():
    """A random-weight LLaVA at the toy world's layout, with its processor."""
    torch.set_num_threads(1)
    return random_toy_llava()


@pytest.fixture(scope="session")
def toy_llava_dir(tmp_path_factory) -> Path:
    """The same random-weight toy LLaVA saved as a llava-hf folder, processor included (a test
    that writes into its model folder saves its own with ``save_random_toy_llava``)."""
    return save_random_toy_llava(tmp_path_factory.mktemp("toy") / "llava")


@pytest.fixture(scope="session")
def shipped_toy_llava():
    """The toy LLaVA shipped in the toy-world assets, loaded as the evaluation loads it."""
    return load_model()


@pytest.fixture(scope="session")
def protocol_data(tmp_path_factory) -> Path:
    """The held-out toy-world scenes exported in the POPE / CHAIR protocol's file layout."""
    out = tmp_path_factory.mktemp("toyset")
    export_heldout(out, seed=3, n_images=4)
    return out


@pytest.fixture(scope="session")
def protocol_model_dir(tmp_path_factory) -> Path:
    """A random-weight llava-hf folder at the toy world's layout, processor included, 3 layers
    64 wide (the width of the reference-format files the protocol tests convert)."""
    from transformers import LlavaForConditionalGeneration

    d = 64
    tokenizer = build_tokenizer()
    config = llava_config(tokenizer)
    config.text_config.update(dict(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2))
    config.vision_config.update(dict(hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=1, num_attention_heads=2))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, name, getattr(tokenizer, name))
    out = tmp_path_factory.mktemp("model")
    model.save_pretrained(out)
    build_llava_processor(tokenizer).save_pretrained(out)
    return out
