"""The toy LexVLA's recipe: its units, its training config, the pairs it trains and is scored
on, what ``evaluate_toy`` measures, and the command's plumbing (training and training's record
kept by ``--evaluate-only``) with the heavy steps stubbed."""

from __future__ import annotations

import json
import os
import tarfile

import pytest
import torch

import eval_suites.toyworld.lexvla_toy as toy
from eval_suites.toyworld.assets_paths import TOY_DIR
from eval_suites.toyworld.world import CLASS_NAMES, COLOURS, SHAPE_SYNONYMS, heldout_scenes
from sae_training.lexvla.train import MODEL_DIR

LLAVA = TOY_DIR / "llava"


def test_units_are_the_lm_tokens_then_the_colour_shape_phrases():
    words = toy.lm_words(LLAVA)
    vocab = json.loads((LLAVA / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(words) == 53 and [vocab[w] for w in words] == sorted(vocab[w] for w in words)
    assert not {"<s>", "</s>", "<unk>", "<pad>", "<image>"} & set(words)
    phrases = toy.toy_phrases()
    assert len(phrases) == len(set(phrases)) == 28
    assert phrases[:3] == ["red star", "blue ring", "blue hoop"]
    assert toy.toy_words() == [*COLOURS, *(w for ws in SHAPE_SYNONYMS.values() for w in ws)]
    assert toy.naming_units() == set(toy.toy_words()) | set(phrases)
    assert toy.class_texts() == [f"a {name}" for name in CLASS_NAMES]
    assert toy.class_texts("{}") == list(CLASS_NAMES)


def test_config_trains_every_unit_with_the_steps_and_penalty_asked_for(tmp_path):
    config = toy.toy_config(LLAVA, tmp_path / "pairs", tmp_path / "run", steps=7,
                            overuse_weight=0.0)
    words = toy.lm_words(LLAVA)
    assert (config.steps, config.overuse_weight) == (7, 0.0)
    assert (config.data, config.out) == (str(tmp_path / "pairs"), str(tmp_path / "run"))
    assert config.model.vocabulary == words and config.model.phrases == toy.toy_phrases()
    assert config.model.max_active == 53 + 28 and config.model.text_model == str(LLAVA)
    assert config.max_samples == toy.TRAIN_PAIRS and config.presence_weight == 5.0
    default = toy.toy_config(LLAVA, tmp_path, tmp_path)
    assert (default.steps, default.overuse_weight) == (toy.STEPS, toy.OVERUSE_WEIGHT)


def test_training_captions_are_the_exported_pairs_captions(tmp_path):
    from eval_suites.toyworld.export import training_pairs

    training_pairs(tmp_path, seed=0, n_pairs=5)
    exported = {}
    for shard in sorted(tmp_path.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".txt"):
                    exported[member.name] = tar.extractfile(member).read().decode()
    assert [exported[k] for k in sorted(exported)] == toy.training_captions(5)


def test_heldout_pairs_are_the_eval_seeds_scenes_with_fixed_captions():
    scenes, captions = toy.heldout_pairs(3)
    assert [s.scene.names for s in scenes] == [s.scene.names for s in heldout_scenes(7, 3)]
    assert captions == [
        "a green cross , a yellow box , a white circle , a purple triangle and a green square "
        "on a dark background .", "the image shows a blue ring and a white circle .",
        "a orange diamond , a cyan hexagon , a blue star and a purple circle on a dark "
        "background ."]


@pytest.mark.skipif(not (TOY_DIR / "lexvla" / "config.json").is_file(),
                    reason="toy LexVLA not trained")
def test_evaluate_toy_scores_what_each_measure_names(tmp_path, monkeypatch):
    from sae_training.lexvla import evaluate as ev
    from sae_training.lexvla.model import LexVLA

    real = toy.training_captions
    monkeypatch.setattr(toy, "training_captions", lambda: real(3))  # 12,000 take seconds
    drawn = []  # drawing the heat-maps takes seconds too
    monkeypatch.setattr(toy, "save_heatmaps", lambda *args, **kw: drawn.append((args, kw)))
    model = LexVLA.from_pretrained(TOY_DIR / "lexvla").eval()
    metrics = toy.evaluate_toy(model, n_images=4, seed=3, heatmaps=tmp_path / "maps")
    scenes, captions = toy.heldout_pairs(4, 3)
    images = [s.image for s in scenes]
    assert metrics["eval"] == {"seed": 3, "n_images": 4}
    assert metrics["retrieval"] == ev.evaluate_retrieval(model, images, captions, list(range(4)))
    labels = torch.stack([torch.from_numpy(ev.patch_labels(s.masks, 8)) for s in scenes])
    weights = ev.patch_weights(model, images)
    for key, template in (("patchdis", "a {}"), ("patchdis_bare_names", "{}")):
        texts = ev.text_vectors(model, [template.format(n) for n in CLASS_NAMES])
        assert metrics[key] == ev.patchdis(weights, texts, labels)["miou"], key
    img, txt = ev.image_vectors(model, images), ev.text_vectors(model, captions)
    assert metrics["sparsity"]["image"] == float((img == 0).float().mean())
    assert metrics["sparsity"]["text_active_words"] == float((txt > 0).sum(1).float().mean())
    used = ev.used_units(model, real(3))
    naming = torch.tensor([w in toy.naming_units() for w in model.words])
    assert metrics["overuse"] == {
        "image_unused": ev.mass_share_outside(img, used),
        "text_unused": ev.mass_share_outside(txt, used),
        "image_non_naming": ev.mass_share_outside(img, naming),
        "text_non_naming": ev.mass_share_outside(txt, naming),
        "n_unused_units": int((~used).sum()), "n_non_naming_units": int((~naming).sum())}
    assert [e["top_words"] for e in metrics["examples"]] == [
        ev.top_words(img[i], model.words, 6) for i in range(4)]  # fewer than six
    assert drawn == [((model, images, tmp_path / "maps"),
                      {"titles": [", ".join(s.scene.names) for s in scenes]})]


class _Model:
    """A trained LexVLA's stand-in: records where it was loaded from and saved to."""

    calls: list = []

    @classmethod
    def from_pretrained(cls, path):
        cls.calls.append(("load", path))
        return cls()

    def save_pretrained(self, out, text_model):
        self.calls.append(("save", out, text_model))
        out.mkdir(parents=True, exist_ok=True)


def _stub(monkeypatch, scored: dict) -> list:
    calls = _Model.calls = []
    monkeypatch.setattr(toy, "LexVLA", _Model)
    monkeypatch.setattr(toy, "training_pairs",
                        lambda out, seed, n_pairs: calls.append(("pairs", out, seed, n_pairs)))
    monkeypatch.setattr(toy, "train", lambda config: calls.append(("train", config)) or
                        {"step": config.steps, "loss": 1.5})
    monkeypatch.setattr(toy, "evaluate_toy", lambda model, heatmaps: calls.append(
        ("evaluate", heatmaps)) or dict(scored))
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("threads", n)))
    assert torch.get_num_threads() == threads
    return calls


SCORED = {"retrieval": {"i2t_r1": 0.5}, "patchdis": 0.25, "sparsity": {}, "overuse": {}}


def test_the_command_trains_the_shipped_recipe_beside_the_shipped_llava_by_default(
        tmp_path, monkeypatch):
    calls = _stub(monkeypatch, SCORED)
    toy.main(["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    config = calls[2][1]
    assert (config.steps, config.overuse_weight) == (toy.STEPS, toy.OVERUSE_WEIGHT)
    assert calls[-1] == ("save", tmp_path / "out",
                         os.path.relpath(LLAVA.resolve(), (tmp_path / "out").resolve()))


def test_the_command_exports_trains_scores_and_saves_beside_the_llava(tmp_path, monkeypatch):
    calls = _stub(monkeypatch, SCORED)
    work, out = tmp_path / "work", tmp_path / "out"
    toy.main(["--work", str(work), "--out", str(out), "--llava", str(LLAVA), "--steps", "3",
              "--overuse-weight", "0", "--threads", "2"])
    config = calls[2][1]
    assert calls == [("threads", 2), ("pairs", work / "pairs", 0, toy.TRAIN_PAIRS),
                     ("train", config), ("load", work / "run" / MODEL_DIR),
                     ("evaluate", work / "heatmaps"),
                     ("save", out, os.path.relpath(LLAVA.resolve(), out.resolve()))]
    assert (config.steps, config.overuse_weight, config.data, config.out) == (
        3, 0.0, str(work / "pairs"), str(work / "run"))
    saved = json.loads((out / "metrics.json").read_text())
    training = saved.pop("training")
    assert saved == SCORED and training["last_log"] == {"step": 3, "loss": 1.5}
    assert {k: training[k] for k in ("steps", "batch_size", "overuse_weight",
                                     "presence_weight")} == {
        "steps": 3, "batch_size": 64, "overuse_weight": 0.0, "presence_weight": 5.0}


def test_evaluate_only_rescores_and_keeps_the_training_record(tmp_path, monkeypatch, capsys):
    calls = _stub(monkeypatch, SCORED)
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"patchdis": 0.1, "stale": 1,
                                                  "training": {"steps": 2400}}))
    toy.main(["--work", str(work), "--out", str(out), "--evaluate-only"])
    assert calls == [("threads", 1), ("load", out), ("evaluate", work / "heatmaps")]
    assert json.loads((out / "metrics.json").read_text()) == {**SCORED,
                                                              "training": {"steps": 2400}}
    assert json.loads(capsys.readouterr().out)["patchdis"] == 0.25


def test_a_kill_while_metrics_are_rewritten_leaves_the_old_ones_whole(tmp_path, monkeypatch):
    import sae_training.store as store

    _stub(monkeypatch, SCORED)
    out = tmp_path / "out"
    out.mkdir()
    old = json.dumps({"patchdis": 0.1, "training": {"steps": 2400}})
    (out / "metrics.json").write_text(old)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(store.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        toy.main(["--work", str(tmp_path / "work"), "--out", str(out), "--evaluate-only"])
    assert (out / "metrics.json").read_text() == old
    assert [p.name for p in out.iterdir()] == ["metrics.json"]  # no temporary file left
