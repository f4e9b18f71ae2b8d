"""LexVLA's training loop at exact values: one step's loss is its weighted terms, each
parameter group learns at its own rate, the learning rate warms up then decays on a cosine,
log records average the steps since the last, the last step is logged and checkpointed, and a
resume refuses a changed config or a checkpoint that lacks weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.jsonl import read_jsonl
from helpers.lexvla import tiny_config
from safetensors.torch import load_file

from sae_training.lexvla import train as train_module
from sae_training.lexvla.config import LexVLATrainConfig
from sae_training.lexvla.losses import (
    caption_word_loss,
    lexical_vectors,
    overuse_penalty,
    presence_loss,
)
from sae_training.losses import info_nce


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from eval_suites.toyworld.export import export_training_pairs

    folder = tmp_path_factory.mktemp("pairs")
    export_training_pairs(folder, seed=0, n_pairs=16)
    return folder


def run_config(pairs, text_model_dir, out, **changes) -> LexVLATrainConfig:
    return LexVLATrainConfig(**{
        "data": str(pairs), "out": str(out), "model": tiny_config(text_model_dir),
        "steps": 4, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1,
        "lr": 1e-2, "lora_lr": 2e-2, "backbone_lr": 3e-2, "max_samples": 16, **changes})


def test_a_step_reports_and_trains_on_the_weighted_sum_of_its_terms(pairs, text_model_dir,
                                                                    tmp_path):
    config = run_config(pairs, text_model_dir, tmp_path, temperature=0.2, overuse_weight=0.3,
                        caption_word_weight=0.5, presence_weight=0.25)
    trainer = train_module.LexVLATrainer(config)
    _, images, captions = next(trainer.stream.batches())
    model = trainer.model.train()
    with torch.no_grad():
        image_scores, text_scores = model(model.pixels(images), captions)
    targets = model.caption_words(captions)
    image, text = lexical_vectors(image_scores), lexical_vectors(text_scores)
    expected = {"infonce": info_nce(image, text, 0.2),
                "overuse": overuse_penalty(image) + overuse_penalty(text),
                "caption_words": (caption_word_loss(image_scores, targets)
                                  + caption_word_loss(text_scores, targets)),
                "presence": (presence_loss(image_scores, targets)
                             + presence_loss(text_scores, targets))}
    expected["loss"] = (expected["infonce"] + 0.3 * expected["overuse"]
                        + 0.5 * expected["caption_words"] + 0.25 * expected["presence"])
    before = model.space.vision_codebook.detach().clone()
    stats = trainer._step(images, captions)
    for name, value in expected.items():
        assert stats[name] == pytest.approx(float(value), rel=1e-5), name
    assert not torch.equal(model.space.vision_codebook.detach(), before)  # a step was taken
    assert trainer.scheduler.last_epoch == 1


def test_each_parameter_group_learns_at_its_own_rate(pairs, text_model_dir, tmp_path):
    config = run_config(pairs, text_model_dir, tmp_path, model=tiny_config(
        text_model_dir, phrases=["red star"]))
    model = train_module.LexVLA.build(config.model)
    groups = train_module.parameter_groups(model, config)
    assert [g["lr"] for g in groups] == [1e-2, 2e-2, 3e-2]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert {id(model.space.vision_codebook), id(model.phrase_text)} <= ids[0]
    lora = [p for n, p in model.text_lm.named_parameters() if "lora_" in n]
    assert lora and ids[1] == {id(p) for p in lora}
    backbone = dict(model.space.backbone.named_parameters())
    assert not backbone.pop("embeddings.mask_token").requires_grad  # (masked pre-training only)
    assert ids[2] == {id(p) for p in backbone.values()}
    frozen = run_config(pairs, text_model_dir, tmp_path,
                        model=tiny_config(text_model_dir, freeze_backbone=True))
    assert len(train_module.parameter_groups(model, frozen)) == 2


def test_warmup_cosine_rates_averaged_records_and_the_last_step_kept(pairs, text_model_dir,
                                                                      tmp_path, monkeypatch):
    losses, real_step = [], train_module.LexVLATrainer._step

    def step(self, *args):
        stats = real_step(self, *args)
        losses.append(stats["loss"])
        return stats

    monkeypatch.setattr(train_module.LexVLATrainer, "_step", step)
    config = run_config(pairs, text_model_dir, tmp_path / "run", log_every=3,
                        checkpoint_every=3)
    last = train_module.train(config)
    log = read_jsonl(tmp_path / "run" / "train_log.jsonl")
    assert [r["step"] for r in log] == [3, 4] and last == log[-1]
    # warm-up over step 1, then 0.5 (1 + cos(pi * (s - 1) / 3)): 1, 0.75, 0.25, 0
    assert log[0]["lr"] == pytest.approx(1e-2 * 0.25) and log[1]["lr"] == pytest.approx(0.0)
    assert log[0]["loss"] == pytest.approx(sum(losses[:3]) / 3)
    assert log[1]["loss"] == pytest.approx(losses[3])
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 4
    with (tmp_path / "run" / "train_log.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 0.0}\n')  # not this run's: past its checkpoint
    assert train_module.train(config) == log[-1]  # finished: nothing trained again
    assert read_jsonl(tmp_path / "run" / "train_log.jsonl") == log


def test_a_resume_refuses_another_config_and_a_checkpoint_without_weights(pairs,
                                                                          text_model_dir,
                                                                          tmp_path):
    config = run_config(pairs, text_model_dir, tmp_path / "run", steps=2)
    train_module.train(config)
    with pytest.raises(ValueError, match=r"different config \(changed: \['temperature'\]\)"):
        train_module.train(run_config(pairs, text_model_dir, tmp_path / "run", steps=2,
                                      temperature=0.1))
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    del state["model"]["space.vision_codebook"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"lacks trainable weights \['space.vision_codebook'\]"):
        train_module.train(config)


def test_a_batch_each_process_cannot_share_equally_is_refused(pairs, text_model_dir, tmp_path,
                                                             monkeypatch):
    real = train_module.make_accelerator

    def three_processes(mixed_precision):
        accelerator = real(mixed_precision)
        accelerator.__class__ = type("Three", (type(accelerator),), {"num_processes": 3})
        return accelerator

    monkeypatch.setattr(train_module, "make_accelerator", three_processes)
    with pytest.raises(ValueError, match="batch_size 8 is not a multiple of the 3 processes"):
        train_module.LexVLATrainer(run_config(pairs, text_model_dir, tmp_path))
    assert train_module.LexVLATrainer(run_config(pairs, text_model_dir, tmp_path,
                                                 batch_size=9)).stream.batch_size == 9


def test_an_old_checkpoint_without_a_data_record_or_cuda_states_resumes_and_no_resume_drops_both(
        pairs, text_model_dir, tmp_path):
    config = run_config(pairs, text_model_dir, tmp_path / "run", steps=2, checkpoint_every=1)
    last = train_module.train(config)
    path = tmp_path / "run" / "checkpoint.pt"
    assert (tmp_path / "run" / "checkpoint.prev.pt").exists()
    state = torch.load(path, weights_only=False)
    del state["data"]  # written before runs recorded their data
    state["rng"] = {"torch": state["rng"]["torch"], "python": state["rng"]["python"]}  # and CUDA's
    torch.save(state, path)
    assert train_module.train(config) == last  # resumed at its last step: nothing trained
    fresh = run_config(pairs, text_model_dir, tmp_path / "run", steps=2, resume=False)
    train_module.train(fresh)  # one checkpoint, at step 2: no earlier one of its own
    assert not (tmp_path / "run" / "checkpoint.prev.pt").exists()
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "train_log.jsonl")] == [1, 2]


TWO_PROCESS_RUN = """
import sys
from helpers.lexvla import tiny_config
from sae_training.lexvla.config import LexVLATrainConfig
from sae_training.lexvla.train import train

pairs, text_model, out = sys.argv[1:]
train(LexVLATrainConfig(data=pairs, out=out, steps=3, batch_size=8, warmup_steps=1,
                        checkpoint_every=2, log_every=1, lr=1e-2, lora_lr=2e-2, backbone_lr=3e-2,
                        max_samples=16, caption_word_weight=1.0, presence_weight=1.0,
                        model=tiny_config(text_model, phrases=["red star"])))
"""


def test_two_processes_train_like_one(pairs, text_model_dir, tmp_path):
    """``torchrun`` with 2 CPU processes (gloo, as ``accelerate launch`` on N GPUs with NCCL),
    the backbone trained: every term sees the gathered batch, so each step's logged losses are
    one process's, and so are the weights (within what AdamW makes of gradients that are float
    noise: a key bias, units no row reaches). Before, the caption-word loss averaged each
    process's own rows that hold a kept word (weights 0.14 apart), and DINOv2's unused mask token
    failed the second step under DDP."""
    script = tmp_path / "run.py"
    script.write_text(TWO_PROCESS_RUN)
    tests = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    for out, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone",
                                                 "--nproc_per_node", "2"])):
        subprocess.run([sys.executable, *launcher, str(script), str(pairs), str(text_model_dir),
                        str(tmp_path / out)], check=True, env=env, capture_output=True)
    assert "2 process(es)" in (tmp_path / "two" / "train.log").read_text()
    one, two = (read_jsonl(tmp_path / out / "train_log.jsonl") for out in ("one", "two"))
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for term in ("loss", "infonce", "overuse", "caption_words", "presence"):
            assert b[term] == pytest.approx(a[term], rel=1e-5, abs=1e-6), (a["step"], term)
    for part in ("model.safetensors", "text_lora/adapter_model.safetensors"):
        a, b = (load_file(str(tmp_path / out / "model" / part)) for out in ("one", "two"))
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-3, rtol=0, msg=name)
