"""A ``PatchReadout``'s own checks and file: every tensor's shape, its layer, its mask of
attributes, a file without its metadata, and a save that fails half-way."""

import pytest
import torch
from helpers.spaces import UNITS, patch_readout
from safetensors.torch import save_file

from vlsae_hooks.patch_readout import PATCH_READOUT_NAME, PatchReadout


@pytest.mark.parametrize("changes, message", [
    ({"weight": torch.zeros(64)}, r"weight must be \[d, n_units\], got \(64,\)"),
    ({"std": torch.ones(65)}, r"std has shape \(65,\), expected \(64,\)"),
    ({"mean": torch.zeros(63)}, r"mean has shape \(63,\), expected \(64,\)"),
    ({"unit_token_ids": UNITS[:3]}, r"unit_token_ids must be \[4, n_spellings\], got \(3, 2\)"),
    ({"unit_token_ids": torch.tensor([[0, 11], [0, -1], [67, 21], [35, -1]])}, "twice"),
])
def test_inconsistent_tensors_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        patch_readout(**changes)


def test_the_layer_is_an_int_and_the_attribute_mask_a_bool():
    with pytest.raises(ValueError, match="layer must be a decoder layer index >= 0, got True"):
        patch_readout(layer=True)
    readout = patch_readout(is_attribute=torch.tensor([1, 1, 0, 0]))
    assert readout.is_attribute.dtype == torch.bool
    assert readout.is_attribute.tolist() == [True, True, False, False]


def test_a_file_without_its_layer_is_refused(tmp_path):
    readout = patch_readout()
    save_file({name: getattr(readout, name).contiguous() for name in PatchReadout.TENSORS},
              str(tmp_path / PATCH_READOUT_NAME), metadata={"supervision": "boxes"})
    with pytest.raises(ValueError, match=r"lacks \['layer'\]; refit it on the image positions"):
        PatchReadout.load(tmp_path)


def test_a_save_that_fails_half_way_keeps_the_earlier_file(tmp_path, monkeypatch):
    patch_readout(layer=1).save(tmp_path)

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as file:
            file.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("vlsae_hooks.tensor_files.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        patch_readout(layer=2).save(tmp_path)
    assert PatchReadout.load(tmp_path).layer == 1
