"""Fitting a patch readout: box and mask coverage, a planted per-patch signal recovered from box
targets and from caption bags (MIL), determinism, the image positions' states, bad inputs."""

from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from sae_training import patch_readout
from sae_training.patch_readout import (
    PatchReadoutConfig,
    auc_list,
    fit_patch_readout,
    image_patch_states,
    mean_auc,
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


def test_patches_are_row_major_and_every_region_of_a_unit_counts():
    assert region_cover((8, 0, 16, 4), 2, 16).tolist() == [0.0, 0.5, 0.0, 0.0]  # top right
    assert region_cover((0, 12, 4, 16), 2, 16).tolist() == [0.0, 0.0, 0.25, 0.0]
    mask = np.zeros((16, 16), dtype=bool)
    mask[:8, 8:] = True
    assert region_cover(mask, 2, 16).tolist() == [0.0, 1.0, 0.0, 0.0]
    targets = patch_targets([[((0, 0, 8, 8), [0]), ((8, 8, 16, 16), [0])],  # one unit, twice
                             [((4, 4, 12, 12), [1])]], 2, 16, 2)  # a quarter of each patch
    assert targets[:, :, 0].tolist() == [[1, 0, 0, 1], [0, 0, 0, 0]]
    assert targets[:, :, 1].tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]  # default min_cover 0.25
    with pytest.raises(ValueError, match=r"names units \[-1\], the readout has 2"):
        patch_targets([[((0, 0, 8, 8), [-1])]], 2, 16, 2)
    with pytest.raises(ValueError, match="image_size 16 is not a multiple of the grid 3"):
        region_cover((0, 0, 8, 8), 3, 16)


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
    probs = readout.probs(held_states)  # an image's logit is its best patch's: the rest stay low
    assert probs[held_targets == 0].mean() < 0.2 and probs[held_targets == 1].mean() > 0.7


def test_the_fit_standardises_by_every_patch_and_starts_rare():
    states, targets = planted(300, seed=0, n_patches=2)  # two chunks of the standardiser
    states[..., 5] = 7.0  # a constant feature: std 1e-6, not 0
    readout = fit_patch_readout(states, targets, UNITS, IS_ATTRIBUTE, 0,
                                PatchReadoutConfig(steps=1, lr=1e-3, weight_decay=0.0))
    flat = states.flatten(0, 1).double()
    torch.testing.assert_close(readout.mean, flat.mean(0).float())
    torch.testing.assert_close(readout.std, (flat.std(0) + 1e-6).float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(readout.bias, torch.full((3,), -3.0), atol=2e-3, rtol=0)

    def weight_norm(weight_decay: float) -> float:
        cfg = PatchReadoutConfig(steps=40, batch_size=32, lr=5e-2, weight_decay=weight_decay)
        return float(fit_patch_readout(states, targets, UNITS, IS_ATTRIBUTE, 0, cfg).weight.norm())

    assert weight_norm(1.0) < 0.8 * weight_norm(0.0)


def test_every_image_is_drawn_and_aucs_are_reported_rounded():
    states, targets = planted(2, seed=0)
    targets[0, :, 2] = 0  # unit 2 shows in the last image only
    targets[1, :3, 2] = 1
    states[1, :3, 2] += 4.0
    readout = fit_patch_readout(states, targets, UNITS, IS_ATTRIBUTE, 0, FAST)
    assert readout.probs(states)[1, :3, 2].min() > 0.5
    assert auc_list(torch.tensor([0.123456, float("nan"), 1.0])) == [0.1235, None, 1.0]
    assert mean_auc(torch.tensor([0.5, float("nan"), 0.7])) == 0.6
    assert mean_auc(torch.tensor([float("nan")])) is None


class FakeExtractor:
    """A ``VLMExtractor`` whose batches hold 4 image positions, then 3."""

    def __init__(self, *args) -> None:
        self.counts = iter([4, 3])

    def site_states(self, samples):
        count = next(self.counts)
        image = torch.zeros(len(samples), 6, dtype=torch.bool)
        image[:, :count] = True
        return {"hidden": torch.zeros(len(samples), 6, 2)}, image, None


def test_images_of_another_number_of_positions_in_a_later_batch_are_refused(monkeypatch):
    monkeypatch.setattr(patch_readout, "VLMExtractor", FakeExtractor)
    images = [Image.new("RGB", (8, 8))] * 3
    with pytest.raises(ValueError, match=r"the same number of image positions .* got \[3\]"):
        image_patch_states(None, None, images, "prompt", 0, batch_size=2, progress=False)


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


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_image_patch_states_of_the_other_families_take_images_of_one_size(family):
    """LLaVA-NeXT and Qwen2.5-VL give an image as many positions as its size asks: images of
    one size give [N, P, d] (a readout fitted on them steers images of any shape,
    tests/vlsae_hooks/test_adapters.py); images of two sizes are refused, saying so."""
    from vlsae_hooks.testing import tiny_llava_next, tiny_processor, tiny_qwen2_5_vl

    model = {"llava_next": tiny_llava_next, "qwen2_5_vl": tiny_qwen2_5_vl}[family](n_layers=2)
    processor = tiny_processor(model)
    g = np.random.default_rng(0)
    images = [Image.fromarray(g.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    states = image_patch_states(model, processor, images, "chat", layer=1, batch_size=2,
                                progress=False)
    assert states.shape == (3, {"llava_next": 36, "qwen2_5_vl": 4}[family], 64)
    assert torch.isfinite(states).all()
    images[1] = Image.fromarray(g.integers(0, 255, (32, 64, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="the same number of image positions .* images of one "
                                         "size"):
        image_patch_states(model, processor, images, "chat", layer=1, progress=False)


def test_spelling_ids_are_the_single_tokens_of_a_units_words(llava):
    tokenizer = llava[1].tokenizer
    ids = spelling_ids(tokenizer, [["w5"], ["w6", "w7", "w6"]])
    assert ids.tolist() == [[tokenizer.convert_tokens_to_ids("w5"), -1],
                            tokenizer.convert_tokens_to_ids(["w6", "w7"])]
    with pytest.raises(ValueError, match=r"no word of the unit \['nothing'\] is one token"):
        spelling_ids(tokenizer, [["nothing"]])


class WordTokenizer:
    """One token per known word (with or without its leading space), else unk (0)."""

    unk_token_id = 0
    VOCAB = {"red": 5, "Red": 6, " red": 7, " Red": 8, " star": 9, "dark red": 10}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.VOCAB.get(text, 0)]


def test_spelling_ids_read_each_case_and_leading_space_of_a_word():
    ids = spelling_ids(WordTokenizer(), [["red"], ["star"], ["blue", "dark red"]])
    assert ids.tolist() == [[5, 6, 7, 8], [9, -1, -1, -1], [10, -1, -1, -1]]
