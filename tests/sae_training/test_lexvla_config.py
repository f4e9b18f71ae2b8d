"""LexVLA's configs refuse what no run can use, and the train command hands each flag to the
config it names (``helpers.lexvla``'s tiny model settings)."""

from __future__ import annotations

import pytest
from helpers.lexvla import tiny_config

from sae_training.lexvla.config import LexVLAConfig, LexVLATrainConfig


@pytest.mark.parametrize(("change", "message"), [
    ({"prompt": "{text} in one word:"}, "needs a '{caption}' slot"),
    ({"backbone_config": None}, "needs a backbone path or a backbone_config"),
    ({"lora_r": 0}, "sizes must be positive"),
    ({"max_active": 0}, "sizes must be positive"),
    ({"min_word_length": 0}, "sizes must be positive"),
])
def test_model_config_refuses_what_no_model_can_be(change, message):
    with pytest.raises(ValueError, match=message):
        tiny_config("lm", **change)
    assert tiny_config("lm", backbone="dino", backbone_config=None).backbone == "dino"


def test_model_config_round_trips_and_refuses_unknown_fields():
    config = tiny_config("lm", phrases=["red star"])
    again = LexVLAConfig.from_dict(config.to_dict())
    assert again == config and again.pixel_mean == (0.5, 0.5, 0.5)  # lists back to tuples
    with pytest.raises(ValueError, match=r"unknown fields \['colour', 'size'\]"):
        LexVLAConfig.from_dict({**config.to_dict(), "size": 3, "colour": "red"})


@pytest.mark.parametrize(("change", "message"), [
    ({"steps": 0}, "steps must be positive"),
    ({"batch_size": 0}, "batch_size must be positive"),
    ({"checkpoint_every": 0}, "checkpoint_every must be positive"),
    ({"log_every": 0}, "log_every must be positive"),
    ({"shuffle_buffer": 0}, "shuffle_buffer must be positive"),
    ({"lr": 0.0}, "learning rates and temperature must be positive"),
    ({"lora_lr": 0.0}, "learning rates and temperature must be positive"),
    ({"backbone_lr": 0.0}, "learning rates and temperature must be positive"),
    ({"temperature": 0.0}, "learning rates and temperature must be positive"),
    ({"overuse_weight": -0.1}, "must be >= 0"),
    ({"caption_word_weight": -0.1}, "must be >= 0"),
    ({"presence_weight": -0.1}, "must be >= 0"),
    ({"warmup_steps": -1}, "must be >= 0"),
])
def test_train_config_refuses_sizes_rates_and_weights_out_of_range(change, message):
    with pytest.raises(ValueError, match=message):
        LexVLATrainConfig(data="d", out="o", model=tiny_config("lm"), **change)


def test_train_config_takes_zero_weights_and_warmup_and_reads_its_model_from_a_dict():
    config = LexVLATrainConfig(data="d", out="o", model=tiny_config("lm").to_dict(),
                               overuse_weight=0.0, warmup_steps=0)
    assert isinstance(config.model, LexVLAConfig) and config.model == tiny_config("lm")


def test_the_train_command_passes_every_flag_on(tmp_path, monkeypatch, capsys):
    from sae_training.lexvla import train as train_module
    from sae_training.lexvla.__main__ import main

    runs = []
    monkeypatch.setattr(train_module, "train",
                        lambda config, skip_bad: runs.append((config, skip_bad)) or {"step": 1})
    (tmp_path / "words.txt").write_text("red blue\nstar\n")
    (tmp_path / "phrases.txt").write_text("red star\n\n  blue ring  \n")
    main(["train", "--data", "pairs", "--out", str(tmp_path / "run"), "--text-model", "lm",
          "--backbone-config", '{"image_size": 32}', "--unfreeze-backbone",
          "--vocabulary", str(tmp_path / "words.txt"), "--phrases", str(tmp_path / "phrases.txt"),
          "--image-size", "64", "--steps", "7", "--batch-size", "4", "--lr", "0.1",
          "--lora-lr", "0.2", "--backbone-lr", "0.3", "--temperature", "0.4",
          "--overuse-weight", "0.5", "--caption-word-weight", "0.6", "--presence-weight", "0.7",
          "--warmup-steps", "3", "--seed", "5", "--max-samples", "9", "--no-resume",
          "--weight-decay", "0.25", "--checkpoint-every", "6", "--log-every", "2",
          "--mixed-precision", "no",
          "--skip-bad", "--vlm", "llava", "--prompt", "{caption} means"])
    assert capsys.readouterr().out.strip() == '{\n  "step": 1\n}'
    (config, skip_bad), = runs
    model = config.model
    assert skip_bad and not config.resume and config.vlm == "llava"
    assert model.prompt == "{caption} means" and model.text_model == "lm"
    assert (model.backbone_config, model.freeze_backbone, model.image_size) == (
        {"image_size": 32}, False, 64)
    assert model.vocabulary == ["red", "blue", "star"]
    assert model.phrases == ["red star", "blue ring"]  # blank lines dropped, ends stripped
    assert (config.steps, config.batch_size, config.lr, config.lora_lr, config.backbone_lr,
            config.temperature, config.overuse_weight, config.caption_word_weight,
            config.presence_weight, config.warmup_steps, config.seed, config.max_samples) == (
        7, 4, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 3, 5, 9)
    assert (config.weight_decay, config.checkpoint_every, config.log_every,
            config.mixed_precision) == (0.25, 6, 2, "no")
    main(["train", "--data", "pairs", "--out", str(tmp_path / "run"), "--text-model", "lm",
          "--backbone", "dino"])
    config, skip_bad = runs[-1]
    assert config.model.freeze_backbone and config.resume and not skip_bad
    assert (config.weight_decay, config.checkpoint_every, config.log_every,
            config.mixed_precision) == (0.01, 500, 50, "auto")  # the config's own defaults
    assert config.model.vocabulary is None and config.model.phrases is None
