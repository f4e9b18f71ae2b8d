"""LexVLA beside CLIP: CLIP's patch classification (by hand on a tiny CLIP), the overuse share
on made-up vectors, and the comparison command on the bundled toy models at a small scale."""

from __future__ import annotations

import json
from types import SimpleNamespace

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


def test_clip_embeddings_do_not_depend_on_the_batch_size(tiny_clip_model):
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    whole, one_by_one = (clip_image_embeddings(tiny_clip_model, pixels, batch_size=b)
                         for b in (64, 2))
    for a, b in zip(whole, one_by_one):
        assert a.shape[0] == 3
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_compare_measures_each_model_on_the_same_pairs(monkeypatch):
    import eval_suites.toyworld.lexvla_vs_clip as vs

    calls = []
    monkeypatch.setattr(vs, "training_captions", lambda n: calls.append(("train", n)) or ["c"])
    monkeypatch.setattr(vs, "measure_lexvla", lambda model, scenes, captions, train: calls.append(
        ("lexvla", model, len(scenes), captions, train)) or ({"m": model}, model))
    monkeypatch.setattr(vs, "measure_clip", lambda model, processor, scenes, captions: calls.append(
        ("clip", model, processor, len(scenes), captions)) or ({"m": model}, model))
    on, off = SimpleNamespace(words=["red", "star"]), SimpleNamespace(words=["x"])
    results, scenes, classes = vs.compare(on, "clip", "proc", n_images=3, seed=5,
                                          n_train_captions=4, lexvla_off=off)
    _, captions = vs.heldout_pairs(3, 5)
    assert [s.scene.names for s in scenes] == [s.scene.names for s in vs.heldout_pairs(3, 5)[0]]
    assert calls == [("train", 4), ("lexvla", on, 3, captions, ["c"]),
                     ("lexvla", off, 3, captions, ["c"]), ("clip", "clip", "proc", 3, captions)]
    assert list(results) == ["lexvla", "lexvla_no_overuse", "clip", "eval"]
    assert [results[m]["m"] for m in vs.MODELS] == [on, off, "clip"] == list(classes.values())
    assert results["eval"] == {"seed": 5, "n_images": 3, "class_texts": vs.class_texts(),
                               "n_train_captions": 4, "lexvla_units": ["red", "star"],
                               "naming_units": sorted(vs.naming_units())}
    assert list(vs.compare(on, "clip", "proc", 2, 5, 4)[0]) == ["lexvla", "clip", "eval"]


def test_markdown_table_rows_columns_and_na():
    from eval_suites.toyworld.lexvla_vs_clip import ROWS, markdown_table

    lexvla = {key: i / 8 for i, (key, _) in enumerate(ROWS)} | {"n_patches": 90, "n_words": 81}
    metrics = {"lexvla": lexvla, "clip": {"patchdis_miou": 0.12345},
               "eval": {"n_images": 4, "seed": 7, "n_train_captions": 20}}
    lines = markdown_table(metrics).splitlines()
    assert lines[:4] == ["| measure | LexVLA | CLIP |", "|---|---|---|",
                         "| PatchDis mIoU | 0.000 | 0.123 |", "| patch accuracy | 0.125 | n/a |"]
    assert lines[len(ROWS) + 1] == ("| text mass on units its own caption does not use "
                                    f"| {(len(ROWS) - 1) / 8:.3f} | n/a |")
    assert lines[-1].startswith("4 held-out pairs (seed 7), 90 scored patches; units used by "
                                "training captions from 20 captions. 81 LexVLA units.")


def test_class_maps_show_each_models_classes_on_the_scored_patches_only(tmp_path, monkeypatch):
    import matplotlib.axes

    from eval_suites.toyworld.lexvla_vs_clip import patch_grid_labels, save_class_maps
    from eval_suites.toyworld.world import heldout_scenes

    shown = []
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow",
                        lambda ax, data, **kw: shown.append(data) if kw else None)
    scenes = heldout_scenes(3, 3)
    truth = patch_grid_labels(scenes, 4)
    guess = {"a": torch.arange(48).reshape(3, 16) % 5, "b": torch.full((3, 16), 2)}
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "0003.png").write_bytes(b"")  # a larger earlier run's: replaced
    paths = save_class_maps(tmp_path, scenes, guess, n=5)  # more than there are scenes
    assert paths == [tmp_path / "maps" / f"{i:04d}.png" for i in range(3)]
    assert sorted((tmp_path / "maps").iterdir()) == paths
    assert all(p.stat().st_size > 0 for p in paths) and len(shown) == 9
    for i in range(3):
        scored = truth[i] >= 0
        expected = [truth[i], torch.where(scored, guess["a"][i], -1),
                    torch.where(scored, guess["b"][i], -1)]
        for data, labels in zip(shown[3 * i:3 * i + 3], expected):
            assert data.shape == (4, 4) and (data.mask == (labels < 0).reshape(4, 4).numpy()).all()
            assert (data.filled(-1) == labels.reshape(4, 4).numpy()).all()


def test_the_command_passes_its_options_through(tmp_path, monkeypatch, capsys):
    import eval_suites.toyworld.lexvla_vs_clip as vs
    from eval_suites.toyworld.world import heldout_scenes

    calls, scenes = [], heldout_scenes(3, 4)
    for folder in ("on", "off"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "lexvla.json").write_text("{}")
    monkeypatch.setattr(vs, "load_models", lambda d: calls.append(("load", d)) or ("L", "C", "P"))
    monkeypatch.setattr(vs.LexVLA, "from_pretrained", lambda d: calls.append(("off", d)) or
                        SimpleNamespace(eval=lambda: "OFF"))
    monkeypatch.setattr(vs, "compare", lambda *args: calls.append(("compare", *args)) or (
        {"lexvla": {"n_patches": 1, "n_words": 2}, "eval": {
            "n_images": 4, "seed": 9, "n_train_captions": 3}}, scenes, {"lexvla": None}))
    monkeypatch.setattr(vs, "save_class_maps", lambda out, s, c, n: calls.append(("maps", n)))
    monkeypatch.setattr(vs, "save_heatmaps", lambda m, images, out, titles: calls.append(
        ("heat", m, len(images), out, titles)))
    argv = ["--out", str(tmp_path / "o"), "--n-images", "4", "--seed", "9", "--maps", "2",
            "--train-captions", "3", "--lexvla", str(tmp_path / "on"), "--lexvla-off",
            str(tmp_path / "off")]
    metrics = vs.main(argv)
    assert calls == [("load", str(tmp_path / "on")), ("off", str(tmp_path / "off")),
                     ("compare", "L", "C", "P", 4, 9, 3, "OFF"), ("maps", 2),
                     ("heat", "L", 2, tmp_path / "o" / "heatmaps",
                      [", ".join(s.scene.names) for s in scenes[:2]])]
    command = "python -m eval_suites.toyworld.lexvla_vs_clip " + " ".join(argv)
    assert metrics["command"] == command
    assert json.loads((tmp_path / "o" / "lexvla_vs_clip.json").read_text()) == metrics
    table = (tmp_path / "o" / "lexvla_vs_clip.md").read_text()
    assert table.startswith(f"# LexVLA beside CLIP\n\n`{command}`\n\n| measure | LexVLA |")
    assert table.endswith(capsys.readouterr().out.removesuffix("\n"))  # printed too


@pytest.mark.parametrize(("argv", "message"), [
    (["--n-images", "0"], "argument --n-images: must be at least 1, got 0"),
    (["--maps", "-1"], "argument --maps: must be 0 (none) or more, got -1"),
    (["--train-captions", "0"], "argument --train-captions: must be at least 1, got 0"),
    (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (["--lexvla", "{tmp}"], "--lexvla {tmp}: no LexVLA there (no lexvla.json); pass a folder"),
    (["--lexvla-off", "{tmp}/x"], "--lexvla-off {tmp}/x: no LexVLA there"),
])
def test_bad_input_ends_in_a_message_and_status_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "o"), *(a.format(tmp=tmp_path) for a in argv)])
    assert exit_info.value.code == 2 and message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
