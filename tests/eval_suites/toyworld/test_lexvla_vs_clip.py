"""LexVLA beside CLIP: CLIP's patch classification (by hand on a tiny CLIP), the overuse share
on made-up vectors, and the comparison command on the bundled toy models at a small scale."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from eval_suites.toyworld.assets_paths import TOY_DIR
from eval_suites.toyworld.lexvla_vs_clip import (
    clip_image_embeddings,
    clip_text_embeddings,
    main,
)
from sae_training.lexvla.evaluate import caption_words, mass_share_outside, patch_classes


def test_clip_patch_classes_as_measured_match_a_hand_computation(tiny_clip_model):
    model = tiny_clip_model
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ids = torch.tensor([[1, 5, 6, 2], [1, 7, 8, 2], [1, 9, 10, 2]])
    classes = clip_text_embeddings(model, ids)
    predicted = patch_classes(clip_image_embeddings(model, pixels)[1], classes)  # measure_clip's
    assert predicted.shape == (2, 16) and predicted.dtype == torch.long
    assert int(predicted.min()) >= 0 and int(predicted.max()) < 3

    with torch.no_grad():  # image 1, patch 5: post-layernorm, projection, cosine argmax
        hidden = model.vision_model(pixel_values=pixels).last_hidden_state[1, 1 + 5]
        patch = model.visual_projection(model.vision_model.post_layernorm(hidden))
        cosine = F.cosine_similarity(patch[None], classes, dim=-1)
        pooled = model.get_image_features(pixel_values=pixels)
    assert int(predicted[1, 5]) == int(cosine.argmax())
    pooled = getattr(pooled, "pooler_output", pooled)  # a tensor before transformers 5
    torch.testing.assert_close(clip_image_embeddings(model, pixels)[0], pooled)


def test_overuse_share_on_made_up_vectors():
    words = ["red", "star", "zzz", "qqq"]
    used = torch.tensor([w in caption_words(["A red star .", "a RED ring"]) for w in words])
    vectors = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert mass_share_outside(vectors, used) == pytest.approx(1.2 / 2.0)
    own = torch.tensor([[True, False, False, False], [False, False, False, True]])
    assert mass_share_outside(vectors, own) == pytest.approx(0.5 / 2.0)
    assert mass_share_outside(torch.zeros(1, 4), used) == 0.0


@pytest.mark.skipif(not (TOY_DIR / "lexvla" / "config.json").is_file(),
                    reason="toy models not shipped")
def test_the_command_writes_table_json_and_maps(tmp_path):
    shipped = str(TOY_DIR / "lexvla")  # as its own no-penalty column: the table's mechanics
    metrics = main(["--out", str(tmp_path), "--n-images", "6", "--maps", "2",
                    "--train-captions", "50", "--lexvla-off", shipped])
    saved = json.loads((tmp_path / "lexvla_vs_clip.json").read_text())
    assert saved["eval"]["n_images"] == 6 and "--train-captions 50" in saved["command"]
    for model in ("lexvla", "clip"):
        assert 0 <= saved[model]["patchdis_miou"] <= 1 and "t2i_r10" in saved[model]
    assert saved["lexvla"]["n_patches"] == saved["clip"]["n_patches"]
    assert 0 <= metrics["lexvla"]["overuse_image"] <= 1 and "overuse_image" not in saved["clip"]
    table = (tmp_path / "lexvla_vs_clip.md").read_text()
    assert "| PatchDis mIoU |" in table and "| R@10 text->image |" in table and "n/a" in table
    assert "| measure | LexVLA | LexVLA, no overuse penalty | CLIP |" in table
    assert saved["lexvla_no_overuse"]["overuse_image"] == saved["lexvla"]["overuse_image"]
    assert saved["eval"]["class_texts"][0] == "a red star"
    assert 0 <= saved["clip"]["patchdis_bare"] <= 1
    # the shipped LexVLA's patches name their class (200 pairs: 0.313 against CLIP's 0.134)
    assert saved["lexvla"]["patchdis_miou"] > 2 * saved["clip"]["patchdis_miou"]
    for folder in ("maps", "heatmaps"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == ["0000.png", "0001.png"]


@pytest.mark.skipif(not (TOY_DIR / "lexvla" / "config.json").is_file(),
                    reason="toy models not shipped")
def test_no_maps_still_writes_the_table(tmp_path):
    main(["--out", str(tmp_path), "--n-images", "4", "--maps", "0", "--train-captions", "20"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lexvla_vs_clip.json",
                                                          "lexvla_vs_clip.md"]
