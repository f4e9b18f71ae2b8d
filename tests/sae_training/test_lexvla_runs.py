"""LexVLA's runs: save/load, a resumable training run and what a run refuses to keep, and the
evaluate command, on the tiny LexVLA (``helpers.lexvla``)."""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock
from helpers.jsonl import read_jsonl
from helpers.lexvla import images, tiny_config

from sae_training.lexvla.config import LexVLATrainConfig
from sae_training.lexvla.model import LexVLA
from vlsae_hooks.spaces import load_space
from vlsae_hooks.spaces.lexvla import LexVLASpace
from vlsae_hooks.tensor_files import user_umask


def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "lex")
    loaded = LexVLA.from_pretrained(tmp_path / "lex")
    with torch.no_grad():
        assert torch.allclose(loaded.image_vectors(images(2)), model.image_vectors(images(2)))
        assert torch.allclose(loaded.text_vectors(["a red star"]),
                              model.text_vectors(["a red star"]), atol=1e-6)
    space = load_space(tmp_path / "lex")
    assert isinstance(space, LexVLASpace) and space.words == model.words
    assert torch.equal(space.vlm_token_ids, model.space.vlm_token_ids)
    assert json.loads((tmp_path / "lex" / "config.json").read_text())["site"] == "pixel_values"
    readable = 0o666 & ~user_umask()  # peft's adapter file too, not owner-only
    assert {stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "lex").rglob("*.*")} == {readable}


def test_training_resumes_to_the_same_weights(text_model_dir, tmp_path, monkeypatch):
    from eval_suites.toyworld.export import export_training_pairs
    from sae_training.lexvla import train as train_module

    export_training_pairs(tmp_path / "pairs", seed=0, n_pairs=24)

    def config(out):
        return LexVLATrainConfig(data=str(tmp_path / "pairs"), out=str(tmp_path / out),
                                 model=tiny_config(text_model_dir, phrases=["red star"]),
                                 steps=4, batch_size=8, warmup_steps=1, checkpoint_every=2,
                                 log_every=3, lr=1e-2, lora_lr=1e-2, max_samples=24,
                                 caption_word_weight=1.0, presence_weight=1.0)

    train_module.train(config("straight"))
    calls = {"n": 0}
    real_step = train_module.LexVLATrainer._step

    def dying_step(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(train_module.LexVLATrainer, "_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(config("resumed"))
    monkeypatch.setattr(train_module.LexVLATrainer, "_step", real_step)
    with (tmp_path / "resumed" / "train_log.jsonl").open("a") as log_file:
        log_file.write('{"step": 3, "lo')  # the kill tore the log's last line: dropped on resume
    train_module.train(config("resumed"))
    a = LexVLA.from_pretrained(tmp_path / "straight" / "model")
    b = LexVLA.from_pretrained(tmp_path / "resumed" / "model")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), name
    fresh = LexVLA.build(tiny_config(text_model_dir, phrases=["red star"])).space.text_codebook
    assert torch.equal(a.space.text_codebook[:-1], fresh[:-1])  # the words' rows stay the LM's
    assert not torch.equal(a.space.text_codebook[-1], fresh[-1])  # the phrase's row trained
    log = read_jsonl(tmp_path / "resumed" / "train_log.jsonl")
    assert [r["step"] for r in log] == [3, 4]
    straight = read_jsonl(tmp_path / "straight" / "train_log.jsonl")
    for resumed, uninterrupted in zip(log, straight, strict=True):  # step 3 averages 1 to 3,
        assert resumed == pytest.approx(uninterrupted, abs=1e-5)  # across the checkpoint at 2
    respelled = config("resumed")  # the same text model, named as a shell completes it
    respelled.model.text_model = f"{text_model_dir}/"
    assert train_module.train(respelled) == log[-1]  # finished: its last record


def test_a_run_keeps_nothing_it_cannot_vouch_for(text_model_dir, tmp_path, monkeypatch):
    """A log of a run killed before its first checkpoint, a checkpoint of other data, a second
    trainer in the folder and an earlier model under --no-resume are none of this run's."""
    from eval_suites.toyworld.export import export_training_pairs
    from sae_training.checkpoint import LOCK_FILE, RunFolderInUse
    from sae_training.lexvla import train as train_module

    export_training_pairs(tmp_path / "pairs", seed=0, n_pairs=16)

    def config(**changes):
        return LexVLATrainConfig(**{
            "data": str(tmp_path / "pairs"), "out": str(tmp_path / "run"),
            "model": tiny_config(text_model_dir), "steps": 2, "batch_size": 8,
            "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1, **changes})

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_log.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    train_module.train(config())
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "train_log.jsonl")] == [1, 2]
    export_training_pairs(tmp_path / "pairs" / "more", seed=1, n_pairs=8)
    (tmp_path / "pairs" / "more" / "00000.tar").rename(tmp_path / "pairs" / "00001.tar")
    with pytest.raises(ValueError, match="changed since .*checkpoint.pt was written"):
        train_module.train(config())
    with FileLock(tmp_path / "run" / LOCK_FILE, timeout=0):
        with pytest.raises(RunFolderInUse, match="in use by another trainer"):
            train_module.train(config(resume=False))
    (tmp_path / "run" / "model" / "stale").write_text("")
    monkeypatch.setattr(train_module.LexVLATrainer, "_step",
                        lambda self, *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed at once: no earlier model left beside it
        train_module.train(config(resume=False))
    assert not (tmp_path / "run" / "model").exists()
    for bad in ({"lr": math.nan}, {"temperature": math.inf}, {"max_samples": 0}):
        with pytest.raises(ValueError, match="finite number|max_samples must be None"):
            config(**bad)


def test_caption_sets_and_the_evaluate_command(model, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from sae_training.lexvla.__main__ import main
    from sae_training.lexvla.evaluate import load_caption_set

    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 60 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    coco = {"images": [{"id": 7, "file_name": "0.png"}, {"id": 9, "file_name": "2.png"}],
            "annotations": [{"image_id": 9, "caption": "a red star"},
                            {"image_id": 7, "caption": "a blue ring"},
                            {"image_id": 9, "caption": "a red ring"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    paths, captions, owner = load_caption_set(tmp_path, tmp_path / "coco.json")
    assert [p.name for p in paths] == ["2.png", "0.png"] and owner == [0, 1, 0]
    (tmp_path / "caps.tsv").write_text("0.png#0\ta red star\n1.png#0\ta blue ring\n"
                                       "2.png#0\ta green square\n0.png#1\ta red ring\n")
    paths, captions, owner = load_caption_set(tmp_path, tmp_path / "caps.tsv")
    assert [p.name for p in paths] == ["0.png", "1.png", "2.png"] and owner == [0, 1, 2, 0]
    (tmp_path / "quoted.tsv").write_text('0.png#0\t"Stop" sign\n1.png#0\t"a 12" record\n'
                                         "2.png#0\ta dog\n")  # quotes are caption text
    assert load_caption_set(tmp_path, tmp_path / "quoted.tsv")[1] == [
        '"Stop" sign', '"a 12" record', "a dog"]
    with pytest.raises(ValueError, match="has no splits"):
        load_caption_set(tmp_path, tmp_path / "caps.tsv", split="test")
    model.save_pretrained(tmp_path / "lex")
    with pytest.raises(SystemExit) as exit_info:  # a path that is no model: a message
        main(["evaluate", "--model", str(tmp_path / "nothing"), "--images", str(tmp_path),
              "--captions", str(tmp_path / "caps.tsv")])
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err
    for device in ("cuda", "gpu0"):  # refused before the model loads
        if device == "cuda" and torch.cuda.is_available():
            continue
        with pytest.raises(SystemExit) as exit_info:
            main(["evaluate", "--model", str(tmp_path / "nothing"), "--images", str(tmp_path),
                  "--captions", str(tmp_path / "caps.tsv"), "--device", device])
        assert exit_info.value.code == 2 and f"device {device}" in capsys.readouterr().err
    moved = []
    monkeypatch.setattr(LexVLA, "to", lambda self, device: moved.append(device) or self)
    main(["evaluate", "--model", str(tmp_path / "lex"), "--images", str(tmp_path),
          "--captions", str(tmp_path / "caps.tsv"), "--heatmaps", str(tmp_path / "maps")])
    assert moved == [torch.device("cuda" if torch.cuda.is_available() else "cpu")]
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n_images"] == 3 and metrics["n_texts"] == 4 and metrics["i2t_r10"] == 1.0
    assert len(list((tmp_path / "maps").glob("*.png"))) == 3


def test_the_commands_refuse_bad_counts_and_json_naming_the_flag(tmp_path, capsys, monkeypatch):
    from sae_training.lexvla.__main__ import main

    evaluate = ["evaluate", "--model", str(tmp_path), "--images", str(tmp_path), "--captions",
                str(tmp_path / "caps.tsv")]
    for argv, message in [
        ([*evaluate, "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["--threads", "0", *evaluate], "argument --threads: must be at least 1, got 0"),
        (["train", "--data", "d", "--out", str(tmp_path / "o"), "--text-model", "t",
          "--backbone-config", '{"image_size": 64,'], "--backbone-config is not valid JSON"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    threads = []  # --threads after the subcommand too (it was refused there)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    with pytest.raises(SystemExit):
        main([*evaluate, "--threads", "1"])  # then refused: no model in tmp_path
    assert threads == [1]


def test_a_save_that_fails_between_its_renames_loses_no_model(model, tmp_path, monkeypatch):
    import sae_training.lexvla.model as model_module

    lex = tmp_path / "lex"
    model.save_pretrained(lex)
    real = model_module.os.replace

    def full_disk_at_the_last_rename(src, dst):
        if Path(dst) == lex:  # the new folder taking the name
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(model_module.os, "replace", full_disk_at_the_last_rename)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(lex)
    monkeypatch.setattr(model_module.os, "replace", real)
    assert LexVLA.from_pretrained(tmp_path / ".lex.old").words == model.words  # kept whole
    model.save_pretrained(lex)  # the next save puts it back first, then replaces it
    assert LexVLA.from_pretrained(lex).words == model.words
    assert not (tmp_path / ".lex.old").exists()
