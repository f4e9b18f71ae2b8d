"""Tensor files (spaces, readouts, activation shards) get the permissions the umask gives any
new file, not safetensors' owner-only 0600."""

import os
import stat
from pathlib import Path

import pytest
import torch
from helpers.spaces import patch_readout, small_space
from safetensors.torch import load_file

from sae_training.store import atomic_write_bytes, write_shard
from vlsae_hooks.tensor_files import save_tensors, user_umask


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_umask_is_read_without_being_changed(umask):
    assert user_umask() == umask
    assert os.umask(umask) == umask  # still the one set


def test_tensor_files_are_as_readable_as_the_umask_lets_them(umask, tmp_path):
    expected = 0o666 & ~umask
    save_tensors({"x": torch.arange(3.0)}, tmp_path / "x.safetensors", metadata={"a": "b"})
    assert torch.equal(load_file(str(tmp_path / "x.safetensors"))["x"], torch.arange(3.0))
    write_shard(tmp_path / "00000.safetensors", torch.zeros(1, 2), torch.ones(1, 2), ["k"],
                ["a caption"], {})
    atomic_write_bytes(tmp_path / "notes.json", b"{}")
    small_space().save_pretrained(tmp_path / "space")
    readout = patch_readout().save(tmp_path / "space")
    for path in (tmp_path / "x.safetensors", tmp_path / "00000.safetensors",
                 tmp_path / "notes.json", tmp_path / "space" / "model.safetensors", readout):
        assert mode(path) == expected, path.name
    assert mode(tmp_path / "space" / "config.json") == expected  # as the json beside it
