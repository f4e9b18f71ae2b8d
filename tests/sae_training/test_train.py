"""Training on synthetic paired activations: it learns, it resumes exactly after a kill, it
revives dead concepts, and its configs refuse bad values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.activations import write_activations
from helpers.jsonl import read_jsonl
from helpers.training import Killed, assert_same_weights, kill_after, log_steps, small_config
from safetensors.torch import load_file

from sae_training import train as train_module
from sae_training.config import ExtractConfig, SAEConfig, TrainConfig
from sae_training.dead_concepts import DeadConcepts
from sae_training.extract import write_manifest
from sae_training.losses import SAEObjective
from sae_training.store import write_shard
from vlsae_hooks.spaces.autoencoder import VLSAE
from vlsae_hooks.spaces.vlsae import VLSAESpace


def test_train_writes_space_metrics_and_logs(activations: Path, tmp_path: Path) -> None:
    config = small_config(activations, tmp_path / "run", aligner_epochs=20, epochs=20)
    metrics = train_module.train(config)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == metrics
    for modality in ("vision", "text"):
        assert 0.5 < metrics["explained_variance"][modality] <= 1
    agreement = metrics["concept_agreement"]
    assert agreement["matched"] > 0.5 > 0.2 > agreement["shuffled"]
    assert agreement["matched_cosine"] > agreement["shuffled_cosine"] + 0.3
    assert agreement["matched_jaccard"] > agreement["shuffled_jaccard"]
    assert metrics["l0"] == pytest.approx(8, abs=0.01)
    assert 0 <= metrics["dead_fraction"] <= 1
    assert metrics["aligner"]["retrieval_top1"] > 0.3  # in-batch, 64 candidates
    assert metrics["steps"] == {"aligner": 20 * 3, "sae": 20 * 7}

    space = VLSAESpace.from_pretrained(tmp_path / "run" / "space")
    cfg = space.config
    assert (cfg.d_model, cfg.n_concepts, cfg.k, cfg.site, cfg.layer, cfg.has_aligner,
            cfg.model_name) == (32, 128, 8, "layer_input", 3, True, "synthetic")
    assert cfg.extra["training"]["sae"]["epochs"] == 20
    records = read_jsonl(tmp_path / "run" / "train_log.jsonl")
    assert [r["stage"] for r in records[:3]] == ["aligner"] * 3
    assert {"loss", "mse_vision", "mse_text", "dead_fraction", "lr"} <= set(records[-1])
    sae_losses = [r["loss"] for r in records if r["stage"] == "sae"]
    assert sae_losses[-1] < sae_losses[0] / 2
    assert "explained variance" in (tmp_path / "run" / "train.log").read_text()


def test_clip_site_skips_the_aligner(tmp_path: Path) -> None:
    write_activations(tmp_path / "acts", n=256, site="clip_embeds")
    metrics = train_module.train(small_config(tmp_path / "acts", tmp_path / "run", epochs=1))
    assert "aligner" not in metrics
    assert not VLSAESpace.from_pretrained(tmp_path / "run" / "space").config.has_aligner


@pytest.mark.parametrize("kill_at", [5, 13])  # inside the aligner stage (6 steps), inside the SAE
def test_killed_and_resumed_run_equals_uninterrupted(activations: Path, straight: Path,
                                                     tmp_path: Path, monkeypatch,
                                                     kill_at: int) -> None:
    reference = json.loads((straight / "metrics.json").read_text())  # what train() returned
    kill_after(monkeypatch, kill_at)
    with pytest.raises(Killed):
        train_module.train(small_config(activations, tmp_path / "killed"))
    assert (tmp_path / "killed" / "checkpoint.pt").is_file()
    monkeypatch.undo()
    resumed = train_module.train(small_config(activations, tmp_path / "killed"))

    assert_same_weights(straight, tmp_path / "killed")
    assert resumed["explained_variance"] == pytest.approx(reference["explained_variance"],
                                                          abs=1e-6)
    assert log_steps(straight) == log_steps(tmp_path / "killed")


def test_a_run_resumed_between_log_records_logs_what_an_uninterrupted_one_logs(
        activations: Path, tmp_path: Path, monkeypatch) -> None:
    """Records average the steps since the last one; a checkpoint (every 4 steps) falls between
    records (every 3), so the resumed run must carry the steps it had summed, not average the
    next record over fewer."""
    def config(out: str):
        run = small_config(activations, tmp_path / out)
        run.log_every = 3
        return run

    train_module.train(config("straight"))
    kill_after(monkeypatch, 13)  # SAE step 7: resumes from step 4, one step past a record
    with pytest.raises(Killed):
        train_module.train(config("killed"))
    monkeypatch.undo()
    train_module.train(config("killed"))
    assert read_jsonl(tmp_path / "killed" / "train_log.jsonl") == \
        read_jsonl(tmp_path / "straight" / "train_log.jsonl")
    a, b = (load_file(str(tmp_path / run / "space" / "model.safetensors"))
            for run in ("straight", "killed"))
    assert all(torch.equal(a[name], b[name]) for name in a)  # bit for bit, as promised


def test_two_processes_train_like_one(activations: Path, tmp_path: Path) -> None:
    """``torchrun`` with 2 CPU processes (gloo, as ``accelerate launch`` on N GPUs with NCCL):
    each takes half of every batch, InfoNCE sees the gathered batch, and the result equals one
    process's run on the same data."""
    args = ["train", "--data", str(activations), "--sae-expansion", "4", "--sae-k", "8",
            "--sae-epochs", "3", "--sae-batch-size", "64", "--sae-lr", "1e-2",
            "--sae-warmup-epochs", "1", "--aligner-epochs", "2", "--aligner-batch-size", "128",
            "--aligner-lr", "1e-2", "--aligner-normalize", "--aligner-pair-weight", "1",
            "--checkpoint-every", "4", "--val-fraction", "0.125"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone",
                                                 "--nproc_per_node", "2"])):
        subprocess.run([sys.executable, *launcher, "-m", "sae_training", *args, "--out",
                        str(tmp_path / out)], check=True, env=env, capture_output=True)
    assert "2 process(es)" in (tmp_path / "two" / "train.log").read_text()
    a = load_file(str(tmp_path / "one" / "space" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "space" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)


def test_resume_refuses_a_changed_config(activations: Path, tmp_path: Path, monkeypatch) -> None:
    kill_after(monkeypatch, 13)
    with pytest.raises(Killed):
        train_module.train(small_config(activations, tmp_path / "run"))
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"different config \(changed: \['sae'\]\)"):
        train_module.train(small_config(activations, tmp_path / "run", k=4))


def test_resume_takes_the_same_folders_however_they_are_spelled(
        activations: Path, straight: Path, tmp_path: Path, monkeypatch) -> None:
    kill_after(monkeypatch, 13)
    with pytest.raises(Killed):
        train_module.train(small_config(activations, tmp_path / "run"))
    monkeypatch.undo()
    monkeypatch.chdir(activations.parent)
    config = small_config(activations, tmp_path / "run")
    config.out += "/"  # as a shell's completion leaves it
    config.data = f"./{activations.name}"  # relative to the working folder
    train_module.train(config)
    assert_same_weights(straight, tmp_path / "run")


def test_resampling_revives_concepts_pointing_away_from_the_data(tmp_path: Path) -> None:
    """Half the concepts start opposite to every input (all inputs lie in the positive
    orthant), so top-k never picks them; resampling must bring them back."""
    d, n = 16, 1024
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, d, generator=g) ** 3 + 0.01
    folder = tmp_path / "acts"
    folder.mkdir()
    info = {"model": "synthetic", "model_type": "clip", "site": "clip_embeds", "layer": None,
            "d_model": d, "prompt": None}
    write_shard(folder / "00000.safetensors", x, x.flip(1), [str(i) for i in range(n)],
                [""] * n, info)
    write_manifest(folder)
    real_init = train_module.VLSAE.__init__

    def init_away(self, d_, h, k):
        real_init(self, d_, h, k)
        with torch.no_grad():
            self.concepts[h // 2:] = -self.concepts[h // 2:].abs()

    metrics = {}
    for resample in (0.0, 1.0):
        config = TrainConfig(data=str(folder), out=str(tmp_path / f"run{resample}"),
                             log_every=50, checkpoint_every=10_000, val_fraction=0.1,
                             sae=SAEConfig(expansion=4, k=4, epochs=12, batch_size=128, lr=3e-3,
                                           warmup_epochs=0, schedule="constant",
                                           resample_epochs=resample))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train_module.VLSAE, "__init__", init_away)
            metrics[resample] = train_module.train(config)
    assert metrics[0.0]["dead_fraction"] >= 0.45
    assert metrics[1.0]["dead_fraction"] < 0.05
    assert "resampled 32 dead concepts" in (tmp_path / "run1.0" / "train.log").read_text()


def test_config_validation_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="k must be positive"):
        SAEConfig(k=0)
    with pytest.raises(ValueError, match="schedule"):
        SAEConfig(schedule="linear")
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(data="d", out="o", val_fraction=1.5)
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(data="d", out="o", mixed_precision="fp8")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        ExtractConfig(model="m", data="d", out="o", batch_size=0)
    with pytest.raises(FileNotFoundError, match="manifest"):
        train_module.train(TrainConfig(data=str(tmp_path), out=str(tmp_path / "run")))
    write_activations(tmp_path / "acts", n=64, d=8)
    with pytest.raises(ValueError, match="exceeds the number of concepts"):
        train_module.train(TrainConfig(data=str(tmp_path / "acts"), out=str(tmp_path / "run"),
                                       sae=SAEConfig(expansion=2, k=17)))


def test_revived_counters_held_out_val_loss_and_biases_at_the_means(
        tmp_path, monkeypatch) -> None:
    write_activations(tmp_path / "acts", n=256, site="clip_embeds")  # no aligner
    trainer = train_module.Trainer(small_config(tmp_path / "acts", tmp_path / "run"))
    sae = VLSAE(32, 128, 8)
    trainer._init_decoder_biases(sae)
    vision, text = trainer.data.store.get(trainer.data.train_rows)
    torch.testing.assert_close(sae.vision_decoder.bias, vision.mean(0))
    torch.testing.assert_close(sae.text_decoder.bias, text.mean(0))
    trainer.sae, trainer.dead = sae, DeadConcepts(128, 100, torch.device("cpu"))
    trainer.dead.since_fired[:5] = 1000
    stage = SimpleNamespace(name="sae", batch_size=64, objective=SAEObjective(sae),
                            optimizer=torch.optim.Adam(sae.parameters()))
    trainer._resample(stage, 3)
    assert not trainer.dead.mask().any()
    read = []
    real_get = trainer.data.store.get
    monkeypatch.setattr(trainer.data.store, "get", lambda rows: read.append(rows) or real_get(rows))
    trainer._val_loss(stage)
    assert read and set(torch.cat(read).tolist()) <= set(trainer.data.val_rows.tolist())
