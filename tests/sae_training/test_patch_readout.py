"""Fitting a patch readout: box and mask coverage, a planted per-patch signal recovered from box
targets and from caption bags (MIL), determinism, the image positions' states, bad inputs."""

from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from sae_training.patch_readout import (
    PatchReadoutConfig,
    fit_patch_readout,
    image_patch_states,
    patch_targets,
    readout_aucs,
    region_cover,
    spelling_ids,
)
from vlsae_hooks.testing import IMAGE_TOKEN

torch.set_num_threads(1)
UNITS = torch.tensor([[5, -1], [6, 7], [8, -1]])
IS_ATTRIBUTE = torch.tensor([True, False, False])
FAST = PatchReadoutConfig(steps=150, batch_size=64, lr=5e-2)


def planted(n: int, seed: int, n_patches: int = 16, d: int = 12):
    """States where unit u shows in a patch as +4 along direction u, each patch showing each
    unit with p = 0.1; returns (states [n, P, d], per-patch targets [n, P, 3])."""
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, n_patches, 3, generator=g) < 0.1).float()
    directions = torch.eye(d)[:3]
    states = torch.randn(n, n_patches, d, generator=g) + 4.0 * targets @ directions
    return states, targets


def test_region_cover_of_boxes_and_masks_and_patch_targets():
    cover = region_cover((0, 0, 8, 4), grid=2, image_size=16)  # patches of 8 px
    assert cover.tolist() == [0.5, 0.0, 0.0, 0.0]
    assert region_cover((4, 4, 12, 12), 2, 16).tolist() == [0.25] * 4
    mask = np.zeros((16, 16), dtype=bool)
    mask[8:, 8:12] = True
    assert region_cover(mask, 2, 16).tolist() == [0.0, 0.0, 0.0, 0.5]
    targets = patch_targets([[((0, 0, 8, 4), [0, 2]), (mask, [1])], [((9, 9, 10, 10), [0])]],
                            grid=2, image_size=16, n_units=3)
    assert targets[0].tolist() == [[1, 0, 1], [0, 0, 0], [0, 0, 0], [0, 1, 0]]
    assert targets[1].sum() == 0  # 1 / 64 of a patch is below min_cover
    with pytest.raises(ValueError, match=r"names units \[3\], the readout has 3"):
        patch_targets([[((0, 0, 8, 8), [3])]], 2, 16, 3)
    with pytest.raises(ValueError, match=r"a mask region must be \[16, 16\]"):
        region_cover(np.zeros((8, 8), dtype=bool), 2, 16)


def test_box_targets_recover_a_planted_per_patch_signal():
    states, targets = planted(400, seed=0)
    readout = fit_patch_readout(states, targets, UNITS, IS_ATTRIBUTE, layer=2, cfg=FAST)
    assert (readout.layer, readout.supervision, readout.d) == (2, "boxes", 12)
    held_states, held_targets = planted(200, seed=1)
    assert readout_aucs(readout, held_states, held_targets).min() > 0.97


def test_caption_bags_recover_the_per_patch_signal_by_multiple_instance_learning():
    states, targets = planted(400, seed=0)
    bags = targets.amax(1)  # [N, M]: does the caption name the unit
    readout = fit_patch_readout(states, bags, UNITS, IS_ATTRIBUTE, layer=0, cfg=FAST)
    assert readout.supervision == "captions"
    held_states, held_targets = planted(200, seed=1)
    assert readout_aucs(readout, held_states, held_targets).min() > 0.9  # per patch
    assert readout_aucs(readout, held_states, held_targets.amax(1)).min() > 0.9  # per image


def test_the_fit_is_deterministic_for_a_seed():
    states, targets = planted(100, seed=0)
    cfg = PatchReadoutConfig(steps=20, batch_size=32)
    first, again = (fit_patch_readout(states, targets, UNITS, IS_ATTRIBUTE, 0, cfg)
                    for _ in range(2))
    other = fit_patch_readout(states, targets, UNITS, IS_ATTRIBUTE, 0,
                              PatchReadoutConfig(steps=20, batch_size=32, seed=1))
    assert torch.equal(first.weight, again.weight) and torch.equal(first.bias, again.bias)
    assert not torch.equal(first.weight, other.weight)


def test_bad_inputs_are_refused_clearly():
    states, targets = planted(20, seed=0)
    broken = states.clone()
    broken[3, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="hold nan/inf"):
        fit_patch_readout(broken, targets, UNITS, IS_ATTRIBUTE, 0, FAST)
    empty = targets.clone()
    empty[..., 1] = 0
    with pytest.raises(ValueError, match=r"units \[1\] have no positive target"):
        fit_patch_readout(states, empty, UNITS, IS_ATTRIBUTE, 0, FAST)
    with pytest.raises(ValueError, match=r"targets must be \[N, P, M\] .* got \(20, 15, 3\)"):
        fit_patch_readout(states, targets[:, 1:], UNITS, IS_ATTRIBUTE, 0, FAST)
    with pytest.raises(ValueError, match=r"is_attribute must be \[3\]"):
        fit_patch_readout(states, targets, UNITS, IS_ATTRIBUTE[:2], 0, FAST)
    with pytest.raises(ValueError, match=r"states must be \[N, P, d\]"):
        fit_patch_readout(states[0], targets, UNITS, IS_ATTRIBUTE, 0, FAST)
    steps = []  # what the readout would refuse is refused before the first step of the fit
    with mock.patch("torch.optim.Adam.step", lambda *a, **k: steps.append(1)):
        shared = UNITS.clone()
        shared[1, 0] = int(UNITS[0, 0])  # one token spelling two units
        with pytest.raises(ValueError, match="must not name a token twice"):
            fit_patch_readout(states, targets, shared, IS_ATTRIBUTE, 0, FAST)
        with pytest.raises(ValueError, match="layer must be a decoder layer index"):
            fit_patch_readout(states, targets, UNITS, IS_ATTRIBUTE, -1, FAST)
    assert steps == []
    with pytest.raises(ValueError, match=r"PatchReadoutConfig\.min_cover must be in \(0, 1\]"):
        PatchReadoutConfig(min_cover=0.0)
    with pytest.raises(ValueError, match=r"PatchReadoutConfig\.steps must be positive"):
        PatchReadoutConfig(steps=0)


def test_image_patch_states_are_the_image_positions_at_the_layer_input(llava):
    model, processor = llava
    g = np.random.default_rng(0)
    images = [Image.fromarray(g.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    prompt = "USER: <image> w5 w6 ASSISTANT:"
    states = image_patch_states(model, processor, images, prompt, layer=1, batch_size=2)
    assert states.shape == (3, 16, 128)
    inputs = processor(images=images, text=[prompt] * 3, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[1]
    expected = hidden[inputs["input_ids"] == IMAGE_TOKEN].view(3, 16, 128)
    torch.testing.assert_close(states, expected, atol=1e-5, rtol=1e-5)


def test_spelling_ids_are_the_single_tokens_of_a_units_words(llava):
    tokenizer = llava[1].tokenizer
    ids = spelling_ids(tokenizer, [["w5"], ["w6", "w7", "w6"]])
    assert ids.tolist() == [[tokenizer.convert_tokens_to_ids("w5"), -1],
                            tokenizer.convert_tokens_to_ids(["w6", "w7"])]
    with pytest.raises(ValueError, match=r"no word of the unit \['nothing'\] is one token"):
        spelling_ids(tokenizer, [["nothing"]])
