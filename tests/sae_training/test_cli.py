"""End to end through the CLI: extract from webdataset shards with a tiny LLaVA, train,
inspect; plus ``--help`` of every subcommand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.image_shards import write_shards

from sae_training.cli import RefusedInput, field_docs, main, parser
from sae_training.config import SAEConfig
from vlsae_hooks.spaces import VLSAE, SpaceConfig, VLSAESpace


def test_every_subcommand_has_help(capsys) -> None:
    for command in ("extract", "train", "inspect"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--sae-k" in out and "--aligner-epochs" in out and "--load-in-4bit" in out
    assert "Active concepts per representation" in out
    assert set(field_docs(SAEConfig)) == {f for f in SAEConfig.__dataclass_fields__}


def test_bad_values_and_missing_data_end_with_a_message(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:  # before any model or data is read
        main(["extract", "--model", "no-such-model", "--data", "d", "--out", "o",
              "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert "ExtractConfig.batch_size must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(tmp_path / "no-activations"), "--out", str(tmp_path / "o")])
    assert str(exit_info.value).startswith(f"error: {tmp_path / 'no-activations'} has no "
                                           "manifest.json")


def test_flags_override_defaults() -> None:
    args = parser().parse_args(["train", "--data", "a", "--out", "b", "--sae-k", "4",
                                "--aligner-epochs", "3", "--no-use-aligner", "--max-samples",
                                "10"])
    assert (args.sae_k, args.aligner_epochs, args.use_aligner, args.max_samples) == (4, 3,
                                                                                     False, 10)
    assert parser().parse_args(["train", "--data", "a", "--out", "b"]).use_aligner is None


def test_extract_train_inspect(llava_dir: Path, tmp_path: Path, capsys) -> None:
    write_shards(tmp_path / "shards", n_shards=2, per_shard=24)
    main(["extract", "--model", str(llava_dir), "--data", str(tmp_path / "shards"),
          "--out", str(tmp_path / "acts"), "--batch-size", "8", "--layer", "2"])
    manifest = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    assert manifest["count"] == 48 and manifest["source"] == str(tmp_path / "shards")
    main(["train", "--data", str(tmp_path / "acts"), "--out", str(tmp_path / "run"),
          "--sae-k", "8", "--sae-expansion", "2", "--sae-epochs", "3", "--sae-batch-size", "16",
          "--aligner-epochs", "2", "--aligner-batch-size", "16", "--val-fraction", "0.2",
          "--log-every", "1"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["explained_variance"]) == {"vision", "text"}
    config = json.loads((tmp_path / "run" / "space" / "config.json").read_text())
    assert (config["site"], config["layer"], config["d_model"], config["n_concepts"]) == (
        "layer_input", 2, 128, 256)
    main(["inspect", "--run", str(tmp_path / "run"), "--concepts", "0", "3", "--top", "3"])
    sheet, curves = (tmp_path / "run" / "inspect" / "concepts.png",
                     tmp_path / "run" / "inspect" / "curves.png")
    assert sheet.stat().st_size > 5000 and curves.stat().st_size > 5000
    assert str(sheet) in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--run", str(tmp_path / "run"), "--concepts", "999"])
    assert exit_info.value.code == 2
    assert str(exit_info.value) == "error: concepts [999] out of range [0, 256)"


def exit_message(argv: list[str]) -> str | int:
    """What ``main(argv)`` exits with: the message of a refused input (whose status is 2, as
    a usage error's), or the status of any other exit."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    if isinstance(exit_info.value, RefusedInput):
        assert exit_info.value.code == 2
        return str(exit_info.value)
    return exit_info.value.code


def test_refused_settings_and_paths_end_with_a_message(llava_dir: Path, activations: Path,
                                                       tmp_path: Path) -> None:
    write_shards(tmp_path / "shards", n_shards=1, per_shard=2)
    extract = ["extract", "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "acts")]
    assert exit_message([*extract, "--model", str(llava_dir), "--layer", "99"]) == (
        "error: layer 99 out of range: the model has 4 layers")
    missing = tmp_path / "missing"
    assert exit_message([*extract, "--model", str(missing)]) == (
        f"error: --model {missing} does not exist: pass an existing folder or a hub name "
        "(owner/name)")
    assert exit_message(["train", "--data", str(activations), "--out", str(tmp_path / "run"),
                         "--sae-k", "100000"]) == (
        "error: k=100000 exceeds the number of concepts h=256 (8 x d=32); lower --sae-k or "
        "raise --sae-expansion")
    readout = ["readout", "--data", str(activations), "--tokenizer", str(llava_dir)]
    assert exit_message([*readout, "--space", str(missing)]) == (
        f"error: no concept space at '{missing}': not a directory")
    assert exit_message([*readout[:-1], str(missing / "tokenizer"), "--space", str(missing)]) == (
        f"error: --tokenizer {missing / 'tokenizer'} does not exist: pass an existing folder or "
        "a hub name (owner/name)")
    config = SpaceConfig(kind="vlsae", d_model=32, n_concepts=64, k=4, model_name="synthetic",
                         model_type="llava", site="layer_input", layer=3, has_aligner=False)
    VLSAESpace(VLSAE(32, 64, 4), None, config).save_pretrained(tmp_path / "space")
    assert exit_message(["readout", "--data", str(missing), "--tokenizer", str(llava_dir),
                         "--space", str(tmp_path / "space")]) == (
        f"error: {missing} has no manifest.json; run `python -m sae_training extract` first (or "
        "let it finish)")
    assert exit_message(["inspect", "--run", str(missing)]) == (
        f"error: --run {missing} is not a `train` output folder (it has no space/config.json): "
        "pass the --out folder of a finished train")
    assert not missing.exists()  # no log folder left behind by a refused command


@pytest.mark.parametrize("flag,value,message", [
    ("--n-concepts", "0", "must be at least 1, got 0"),
    ("--top", "-1", "must be at least 1, got -1"),
    ("--max-samples", "x", "expected a whole number, got 'x'")])
def test_inspect_counts_must_be_positive(flag: str, value: str, message: str, capsys) -> None:
    assert exit_message(["inspect", "--run", "r", flag, value]) == 2
    assert capsys.readouterr().err.endswith(f"error: argument {flag}: {message}\n")


def test_ctrl_c_ends_with_a_hint_to_resume(activations: Path, tmp_path: Path, monkeypatch,
                                            capsys) -> None:
    def interrupted(*args, **kwargs) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("sae_training.train.train", interrupted)
    assert exit_message(["train", "--data", str(activations), "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "interrupted; rerun the same command to resume\n"
    monkeypatch.setattr("sae_training.readout.train_readout", interrupted)  # not resumable
    assert exit_message(["readout", "--space", str(tmp_path), "--data", str(activations),
                         "--tokenizer", "t"]) == 130
    assert capsys.readouterr().err == "interrupted; rerun the same command to start it over\n"
