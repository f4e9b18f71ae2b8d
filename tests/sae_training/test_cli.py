"""End to end through the CLI: extract from webdataset shards with a tiny LLaVA, train,
inspect; plus ``--help`` of every subcommand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.image_shards import write_shards

from sae_training.cli import field_docs, main, parser
from sae_training.config import SAEConfig


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
    with pytest.raises(ValueError, match="out of range"):
        main(["inspect", "--run", str(tmp_path / "run"), "--concepts", "999"])
