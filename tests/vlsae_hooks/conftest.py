"""Fixtures of the runtime tests, each built once per session: the tiny LLaVA, an untrained
space at the input of its decoder layer 2, each steering mode's space for it, and a two-row
batch; and, per test, the reference's released files in ``tmp_path``. The root conftest
checks that no test changes the session's fixtures (a test attaches and removes; it never keeps
hooks or edits weights)."""

import pytest
import torch
from helpers.reference import write_reference
from helpers.spaces import steering_spaces

from vlsae_hooks.testing import left_pad, llava_prompt, random_space


@pytest.fixture(scope="session")
def model(tiny_llava_model):
    """The shared tiny LLaVA (``tiny_llava()``, seed 0), by the name the runtime tests use."""
    return tiny_llava_model


@pytest.fixture(scope="session")
def space(model):
    """``random_space(model, layer=2)``: 256 concepts, k 8, with an aligner."""
    return random_space(model, layer=2)


@pytest.fixture(scope="session")
def spaces(model) -> dict:
    """``steering_spaces(model)``: the space each mode of ``helpers.spaces.STEERING`` steers the
    tiny LLaVA with."""
    return steering_spaces(model)


@pytest.fixture(scope="session")
def rows() -> list[list[int]]:
    """Two LLaVA prompts of different lengths (left padding has work to do)."""
    return [llava_prompt([5, 6, 7, 8, 9]), llava_prompt([9, 10])]


@pytest.fixture(scope="session")
def pixels() -> torch.Tensor:
    """One random 32 px image per row of ``rows`` (seed 3)."""
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="session")
def batch(rows, pixels) -> dict:
    """``rows`` left-padded, with ``pixels``."""
    return {**left_pad(rows), "pixel_values": pixels}


@pytest.fixture()
def reference_files(tmp_path) -> tuple:
    """``write_reference(tmp_path)``: the reference's SAE and auxiliary files at small dims
    (their paths, then their state dicts)."""
    return write_reference(tmp_path)
