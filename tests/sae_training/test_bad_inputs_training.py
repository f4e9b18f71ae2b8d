"""Training and readout fitting refuse bad inputs up front with a message that says what to do,
and survive what a crash leaves behind (a torn checkpoint or log line), without ever resuming
onto changed data, sharing a run folder, or loading a readout of other space weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from helpers.activations import write_activations, write_pairs
from helpers.training import Killed, assert_same_weights, kill_after, log_steps, small_config

from eval_suites.toyworld.assets_paths import TOY_DIR
from eval_suites.toyworld.build import build_llava_processor
from sae_training import results as results_module
from sae_training import train as train_module
from sae_training.checkpoint import RunFolderInUse
from sae_training.cli import main
from sae_training.config import AlignerConfig, ReadoutConfig, SAEConfig, TrainConfig
from sae_training.grounding_config import PatchReadoutConfig, PatchReadoutRunConfig
from vlsae_hooks.spaces import VLSAE, SpaceConfig, VLSAESpace, load_space
from vlsae_hooks.word_evidence import FINGERPRINT, space_fingerprint

TOY_SPACE = TOY_DIR / "llava" / "vlsae_space"


def _killed_run(data: Path, out: Path, monkeypatch, kill_at: int = 17) -> None:
    """A run killed in the SAE stage after its checkpoints at SAE steps 4 and 8 (kill_at 17)."""
    kill_after(monkeypatch, kill_at)
    with pytest.raises(Killed):
        train_module.train(small_config(data, out))
    monkeypatch.undo()


# 1 ------------------------------------------------------------------------- NaN / inf settings
@pytest.mark.parametrize("flag", ["--aligner-temperature=nan", "--sae-lr=nan", "--sae-lr=inf",
                                  "--sae-auxk-coef=nan", "--aligner-pair-weight=inf"])
def test_train_refuses_non_finite_settings_at_parse_time(flag: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "no-such-folder", "--out", "o", flag])
    assert exit_info.value.code == 2
    assert "must be a finite number" in capsys.readouterr().err


def test_every_config_refuses_nan() -> None:
    nan = float("nan")
    for make in (lambda: AlignerConfig(pair_weight=nan), lambda: SAEConfig(warmup_epochs=nan),
                 lambda: TrainConfig(data="d", out="o", val_fraction=nan),
                 lambda: ReadoutConfig(space="s", data="d", tokenizer="t", l2=nan)):
        with pytest.raises(ValueError, match="finite"):
            make()
    with pytest.raises(SystemExit):
        main(["readout", "--space", "s", "--data", "d", "--tokenizer", "t", "--l2", "nan"])


def run_config(**changed) -> PatchReadoutRunConfig:
    return PatchReadoutRunConfig(**{"model": "m", "boxes": "b", "images": "i", "space": "s",
                                    **changed})


@pytest.mark.parametrize("make,message", [
    (lambda: AlignerConfig(pair_weight=-1.0), r"AlignerConfig.pair_weight must be >= 0, got -1.0"),
    (lambda: SAEConfig(resample_epochs=-1), r"SAEConfig.auxk_coef, warmup_epochs and "
                                            r"resample_epochs must be"),
    (lambda: ReadoutConfig(space="s", data="d", tokenizer="t", l2=-0.5),
     r"ReadoutConfig.l2 must be >= 0, got -0.5"),
    (lambda: PatchReadoutConfig(weight_decay=-1e-4),
     r"PatchReadoutConfig.weight_decay must be >= 0"),
    (lambda: run_config(layer=-1), r"layer must be a decoder layer index >= 0, got -1"),
    (lambda: run_config(layer=True), r"layer must be a decoder layer index >= 0, got True"),
    (lambda: run_config(attributes="attributes.json"), r"attributes \(Visual Genome "
                                                       r"attributes.json\) and vg_images"),
    (lambda: run_config(prompt="Q: {caption}"), r"prompt needs '<image>' \(or 'chat'\)")])
def test_every_config_refuses_a_setting_outside_its_range(make, message) -> None:
    with pytest.raises(ValueError, match=message):
        make()


# 2 ------------------------------------------------------------------------- k > h
def test_k_above_the_dictionary_size_is_refused_before_any_training(tmp_path: Path) -> None:
    write_activations(tmp_path / "acts", n=64, d=8)
    config = small_config(tmp_path / "acts", tmp_path / "run", expansion=2, k=17)
    with pytest.raises(ValueError, match=r"k=17 exceeds the number of concepts h=16"):
        train_module.Trainer(config)  # before the aligner stage, not after it


# 3 ------------------------------------------------------------------------- too little data
def test_too_little_data_is_refused_with_the_minimum(activations: Path, tmp_path: Path) -> None:
    config = small_config(activations, tmp_path / "run")
    config.max_samples = 1
    with pytest.raises(ValueError, match="gives 1 pair.*at least 4"):
        train_module.train(config)
    assert not (tmp_path / "run").exists()
    config.max_samples = 4  # the minimum trains and reports finite metrics
    config.out, config.use_aligner, config.sae.epochs = str(tmp_path / "min"), False, 1
    metrics = train_module.train(config)
    assert metrics["n_val"] == 2 and metrics["n_train"] == 2


def test_the_space_is_saved_before_the_metrics(activations: Path, tmp_path: Path,
                                               monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise ZeroDivisionError

    monkeypatch.setattr(results_module, "evaluate", broken)
    config = small_config(activations, tmp_path / "run", epochs=1)
    config.use_aligner = False
    with pytest.raises(ZeroDivisionError):
        train_module.train(config)
    assert VLSAESpace.from_pretrained(tmp_path / "run" / "space").config.n_concepts == 128


# 4 ------------------------------------------------------------------------- torn checkpoint
def test_a_torn_checkpoint_falls_back_to_the_previous_one(activations: Path, straight: Path,
                                                          tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    _killed_run(activations, run, monkeypatch)
    newest = run / "checkpoint.pt"
    assert (run / "checkpoint.prev.pt").is_file()
    newest.write_bytes(newest.read_bytes()[:1000])
    _killed_run(activations, run, monkeypatch, kill_at=5)  # from SAE step 4 past its next save at 8
    previous = torch.load(run / "checkpoint.prev.pt", weights_only=True)  # not the torn file
    assert (previous["stage"], previous["step"]) == ("sae", 4)
    log = (run / "train.log").read_text()
    assert f"{newest} is unreadable" in log and "resuming from the previous checkpoint" in log
    train_module.train(small_config(activations, run))
    assert_same_weights(straight, run)
    assert log_steps(straight) == log_steps(run)


def test_unreadable_checkpoints_and_aligner_name_the_path_and_the_remedy(
        activations: Path, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    _killed_run(activations, run, monkeypatch)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (run / name).write_bytes(b"torn")
    with pytest.raises(RuntimeError, match=r"checkpoint\.prev\.pt \(.*Delete checkpoint\.pt"):
        train_module.train(small_config(activations, run))
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (run / name).unlink()
    (run / "aligner.safetensors").write_bytes(b"torn")
    with pytest.raises(RuntimeError, match=rf"{run / 'aligner.safetensors'} is unreadable .*"
                                           "delete it to retrain the aligner"):
        train_module.train(small_config(activations, run))


# 5 ------------------------------------------------------------------------- torn log line
def test_a_torn_last_log_line_is_dropped_on_resume(activations: Path, straight: Path,
                                                   tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    _killed_run(activations, run, monkeypatch)
    with (run / "train_log.jsonl").open("a") as f:
        f.write('{"stage": "sae", "st')
    train_module.train(small_config(activations, run))
    assert_same_weights(straight, run)
    assert log_steps(straight) == log_steps(run)
    assert "dropping the torn last line" in (run / "train.log").read_text()


# 6 ------------------------------------------------------------------------- changed data
def test_resume_refuses_data_changed_since_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    acts, run = tmp_path / "acts", tmp_path / "run"
    write_activations(acts)
    _killed_run(acts, run, monkeypatch)
    write_activations(acts, n=520)  # a part re-extracted with more pairs
    with pytest.raises(ValueError, match=rf"the data in {acts} changed since the checkpoint"):
        train_module.train(small_config(acts, run))


# 7 ------------------------------------------------------------------------- one trainer a folder
def test_a_second_trainer_on_the_same_out_is_refused(activations: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with FileLock(run / ".lock"), pytest.raises(RunFolderInUse,
                                                match=rf"{run} is in use by another trainer"):
        train_module.train(small_config(activations, run))
    assert not (run / "train_log.jsonl").exists()


# 8 ------------------------------------------------------------------------- stale readouts
def test_a_readout_of_a_retrained_space_is_refused(tmp_path: Path) -> None:
    def save_space(seed: int) -> None:
        torch.manual_seed(seed)
        config = SpaceConfig(kind="vlsae", d_model=32, n_concepts=128, k=16, model_name="toy",
                             model_type="llava", site="layer_input", layer=0, has_aligner=False)
        VLSAESpace(VLSAE(32, 128, 16), None, config).save_pretrained(tmp_path / "space")

    save_space(0)
    build_llava_processor().save_pretrained(tmp_path / "tokenizer")
    write_pairs(tmp_path / "acts", shuffle=False)
    main(["readout", "--space", str(tmp_path / "space"), "--data", str(tmp_path / "acts"),
          "--tokenizer", str(tmp_path / "tokenizer"), "--min-count", "10", "--epochs", "2",
          "--min-auc", "0"])
    info = json.loads((tmp_path / "space" / "word_readout.json").read_text())
    assert info[FINGERPRINT] == space_fingerprint(tmp_path / "space")
    assert load_space(tmp_path / "space").word_readout is not None
    save_space(1)  # retrained into the same folder; the old readout stays beside it
    with pytest.warns(UserWarning, match="fitted on other weights"):
        space = load_space(tmp_path / "space")  # it steers, in the modes that read no readout
    with pytest.raises(ValueError, match="fitted on other weights.*refit it on the pooled concept "
                                         "codes .*docs/steering.md"):
        space.readout("word_readout")


def test_the_shipped_toy_readouts_match_their_space() -> None:
    fingerprint = space_fingerprint(TOY_SPACE)
    for name in ("word_readout.json", "phrase_readout.json"):
        assert json.loads((TOY_SPACE / name).read_text())[FINGERPRINT] == fingerprint
    space = load_space(TOY_SPACE)
    assert space.word_readout is not None and space.phrase_readout is not None


# 9 ------------------------------------------------------------------------- not an extraction
def test_a_torn_or_foreign_activation_folder_is_named_with_what_to_do(tmp_path: Path) -> None:
    acts, run = tmp_path / "acts", str(tmp_path / "run")
    write_activations(acts, n=64, per_shard=32)
    manifest = (acts / "manifest.json").read_text()
    (acts / "manifest.json").write_text(manifest[:100])
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(acts), "--out", run])
    with pytest.raises(json.JSONDecodeError) as torn:
        json.loads(manifest[:100])
    assert str(exit_info.value) == (
        f"error: {acts / 'manifest.json'} is not valid JSON ({torn.value}): it is damaged; run "
        "`vlsae extract` again with the same --out to rewrite it")
    (acts / "manifest.json").write_text('{"seed": 0, "shards": [], "pope": {}}')  # an export
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(acts), "--out", run])
    assert str(exit_info.value) == (f"error: {acts} is not an extraction folder (no d_model in "
                                    "its manifest): run `vlsae extract` first")
    (acts / "manifest.json").write_text(manifest)
    shard = acts / "00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # cut short
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(acts), "--out", run])
    assert str(exit_info.value) == (
        f"error: activation shard {shard} cannot be read (ValueError: mmap length is greater "
        "than file size): it is missing, cut short or damaged; run `vlsae extract` again with "
        "the same --out, which redoes that part")


def test_the_command_resuming_with_a_changed_setting_ends_with_a_message(
        tmp_path: Path, monkeypatch) -> None:
    acts, run = tmp_path / "acts", tmp_path / "run"
    write_activations(acts)
    _killed_run(acts, run, monkeypatch)
    flags = ["--log-every", "2", "--checkpoint-every", "4", "--val-fraction", "0.125",
             "--aligner-epochs", "2", "--aligner-batch-size", "128", "--aligner-lr", "0.01",
             "--aligner-normalize", "--aligner-pair-weight", "1.0", "--sae-expansion", "4",
             "--sae-epochs", "3", "--sae-batch-size", "64", "--sae-lr", "0.01",
             "--sae-warmup-epochs", "1"]
    with pytest.raises(SystemExit) as exit_info:  # small_config's flags, but --sae-k 4
        main(["train", "--data", str(acts), "--out", str(run), *flags, "--sae-k", "4"])
    assert str(exit_info.value) == (
        f"error: the checkpoint in {run} was written with a different config (changed: ['sae']); "
        "use a new --out folder or --no-resume")
