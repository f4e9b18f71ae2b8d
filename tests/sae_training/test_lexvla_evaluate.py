"""LexVLA's evaluation at exact values: Karpathy splits, json caption lists, missing images,
patch labels at exactly half cover, PatchDis with a class predicted but absent, and the share
of mass outside the allowed words."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sae_training.lexvla.evaluate import (
    load_caption_set,
    mass_share_outside,
    patch_labels,
    patchdis,
)


def test_karpathy_splits_json_lists_and_missing_images(tmp_path):
    for i in range(3):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{i}.png")
    karpathy = {"images": [
        {"filename": "0.png", "split": "train", "sentences": [{"raw": "a red star"}]},
        {"filename": "1.png", "split": "test", "sentences": [{"raw": " a blue ring "},
                                                            {"raw": "a ring"}]}]}
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    paths, captions, owner = load_caption_set(tmp_path, tmp_path / "k.json", split="test")
    assert [p.name for p in paths] == ["1.png"] and captions == ["a blue ring", "a ring"]
    assert owner == [0, 0]
    assert len(load_caption_set(tmp_path, tmp_path / "k.json")[1]) == 3
    listed = [{"image": "2.png", "captions": ["a star", "a green star"]},
              {"image": "0.png", "caption": "a red star"}]
    (tmp_path / "l.json").write_text(json.dumps(listed))
    assert load_caption_set(tmp_path, tmp_path / "l.json")[1:] == (
        ["a star", "a green star", "a red star"], [0, 0, 1])
    (tmp_path / "m.json").write_text(json.dumps([{"image": "9.png", "caption": "a dog"}]))
    with pytest.raises(FileNotFoundError, match="1 images missing"):
        load_caption_set(tmp_path, tmp_path / "m.json")


def test_half_cover_labels_a_patch_and_a_wrong_guess_of_an_absent_class_costs_nothing():
    masks = np.zeros((1, 2, 2), dtype=bool)
    masks[0, 0, :] = True  # half of the one patch
    assert patch_labels(masks, 1).tolist() == [0]
    classes = torch.eye(3)
    weights = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])  # patch 1 guessed class 2
    result = patchdis(weights, classes, torch.tensor([[0, 0]]))
    assert result["per_class_iou"] == {0: 0.5}  # class 2 is not in the ground truth
    assert result["miou"] == 0.5 and result["patch_accuracy"] == 0.5


def test_mass_share_outside_the_allowed_words():
    vectors = torch.tensor([[0.6, 0.2, 0.2], [0.0, 0.0, 1.0]])
    assert mass_share_outside(vectors, torch.tensor([True, False, True])) == pytest.approx(0.1)
    allowed = torch.tensor([[True, True, False], [False, False, False]])
    assert mass_share_outside(vectors, allowed) == pytest.approx(0.6)
    assert mass_share_outside(torch.zeros(1, 3), torch.ones(3, dtype=torch.bool)) == 0.0
