"""LexVLA's evaluate command passing its options on (split, batch size, how many heat-maps, the
metrics file), train interrupted exiting with 130, and evaluation's own edges: a captions file
with no captions, units used by captions read in batches, heat-map files named in order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sae_training.lexvla import evaluate as evaluate_module
from sae_training.lexvla.__main__ import main
from sae_training.lexvla.model import LexVLA


def test_the_evaluate_command_passes_its_options_on(tmp_path, monkeypatch, capsys):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 8, 3), 80 * i, dtype=np.uint8)).save(paths[-1])
    calls = {}

    class Loaded:
        def to(self, device):
            return self

    monkeypatch.setattr(LexVLA, "from_pretrained", classmethod(lambda cls, path: Loaded()))
    monkeypatch.setattr(evaluate_module, "load_caption_set", lambda images, captions, split: (
        calls.update(read=(images, captions, split)) or (paths, ["a", "b", "c"], [0, 1, 2])))
    monkeypatch.setattr(evaluate_module, "evaluate_retrieval",
                        lambda model, images, captions, owner, batch_size: calls.update(
                            batch_size=batch_size, n=len(images)) or {"i2t_r1": 0.5})
    monkeypatch.setattr(evaluate_module, "save_heatmaps", lambda model, images, out: calls.update(
        heatmaps=(len(images), out)))
    main(["evaluate", "--model", "m", "--images", "imgs", "--captions", "caps.json", "--split",
          "test", "--batch-size", "5", "--heatmaps", "maps", "--n-heatmaps", "2", "--json",
          str(tmp_path / "metrics.json"), "--device", "cpu"])
    assert calls == {"read": ("imgs", "caps.json", "test"), "batch_size": 5, "n": 3,
                     "heatmaps": (2, "maps")}
    assert json.loads(capsys.readouterr().out) == {"i2t_r1": 0.5}
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"i2t_r1": 0.5}


def test_an_interrupted_train_exits_130_saying_it_resumes(monkeypatch, capsys, tmp_path):
    from sae_training.lexvla import train as train_module

    def interrupted(config, skip_bad):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "d", "--out", str(tmp_path / "o"), "--text-model", "t",
              "--backbone", "dino"])
    assert exit_info.value.code == 130 and "interrupted" in capsys.readouterr().err


def test_a_captions_file_without_captions_is_refused(tmp_path):
    (tmp_path / "caps.tsv").write_text("only-one-column\n")
    with pytest.raises(ValueError, match="no captions read from"):
        evaluate_module.load_caption_set(tmp_path, tmp_path / "caps.tsv")


def test_used_units_read_every_batch_and_heatmaps_are_named_in_order(model, tmp_path,
                                                                    monkeypatch):
    from matplotlib.axes import Axes

    titles, real_title = [], Axes.set_title
    monkeypatch.setattr(Axes, "set_title", lambda ax, text, **kw: titles.append(text)
                        or real_title(ax, text, **kw))
    used = evaluate_module.used_units(model, ["a red star", "a blue ring"], batch_size=1)
    assert [w for w, u in zip(model.words, used.tolist()) if u] == ["red", "blue", "star",
                                                                   "ring"]
    assert evaluate_module.save_heatmaps(model, [], tmp_path / "none") == []
    shown = [Image.new("RGB", (32, 32), (40 * i, 0, 0)) for i in range(2)]
    (tmp_path / "maps").mkdir()
    for name in ("0002.png", "notes.png"):  # a larger earlier run's last map; the user's own
        (tmp_path / "maps" / name).write_bytes(b"")
    with torch.no_grad():
        paths = evaluate_module.save_heatmaps(model, shown, tmp_path / "maps", top_k=2,
                                              titles=["one", "two"])
    assert [p.name for p in paths] == ["0000.png", "0001.png"] and all(p.is_file() for p in paths)
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [
        "0000.png", "0001.png", "notes.png"]
    assert titles[0] == "one" and titles[3] == "two" and len(titles) == 6  # image, 2 words each


def test_a_train_into_a_folder_another_trainer_holds_is_refused_without_a_traceback(
        monkeypatch, capsys, tmp_path):
    """The same command run twice at once: the second exits 2 naming the lock, as every
    refused input does."""
    from filelock import FileLock

    from sae_training.checkpoint import LOCK_FILE, locked_run_folder
    from sae_training.lexvla import train as train_module

    def train(config, skip_bad):
        with locked_run_folder(tmp_path / "o", True):
            raise AssertionError("the lock was taken twice")

    monkeypatch.setattr(train_module, "train", train)
    (tmp_path / "o").mkdir()
    with FileLock(tmp_path / "o" / LOCK_FILE, timeout=0), pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "d", "--out", str(tmp_path / "o"), "--text-model", "t",
              "--backbone", "dino"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'o'} is in use by another trainer "
                                       f"(it holds {tmp_path / 'o' / LOCK_FILE}); wait for it to "
                                       "finish or train into another --out\n")
