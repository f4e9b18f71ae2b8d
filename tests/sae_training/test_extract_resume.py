"""Resuming an extraction: what a rerun keeps, redoes and refuses (a part killed, other
dtypes, a sample cap, other data, another artifact's folder), on an extractor without a model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers.extraction import KeyRows
from helpers.image_shards import write_shards
from safetensors.torch import load_file

from sae_training.cli import main
from sae_training.extract import extract, write_manifest
from sae_training.readers import open_source
from sae_training.store import ActivationStore, shard_metadata


def test_a_folder_of_shards_saved_in_two_dtypes_reads_back_each_as_it_is(tmp_path: Path) -> None:
    write_shards(tmp_path / "data", n_shards=2, per_shard=3)
    out = tmp_path / "acts"
    extract(KeyRows(), open_source(str(tmp_path / "data")), out, "tiny", save_dtype="float32")
    (out / "00001.safetensors").unlink()  # redone by a run saving bfloat16
    extract(KeyRows(), open_source(str(tmp_path / "data")), out, "tiny", save_dtype="bfloat16")
    manifest = write_manifest(out)
    vision, text = ActivationStore(out).get(torch.tensor([4, 0, 5, 2]))
    assert vision.dtype == torch.float32 and vision.shape == (4, 4)
    assert torch.equal(vision, torch.tensor([4.0, 0.0, 5.0, 2.0])[:, None].expand(4, 4))
    assert torch.equal(text, vision + 1)
    assert manifest["dtype"] == "mixed (BF16, F32)"


def test_a_rerun_with_max_samples_counts_the_pairs_already_extracted(tmp_path: Path) -> None:
    write_shards(tmp_path / "data", n_shards=3, per_shard=4)
    out = tmp_path / "acts"
    for _ in range(2):  # the second run: as after a kill, the same command again
        extract(KeyRows(), open_source(str(tmp_path / "data")), out, "tiny", max_samples=6)
        manifest = write_manifest(out, open_source(str(tmp_path / "data")))
        assert [(s["file"], s["count"]) for s in manifest["shards"]] == [
            ("00000.safetensors", 4), ("00001.safetensors", 2)]
        assert manifest["count"] == 6 and not manifest["complete"]
    # a smaller cap than the pairs already held: nothing more to do (not a negative budget)
    assert extract(KeyRows(), open_source(str(tmp_path / "data")), out, "tiny", max_samples=3) == []


@pytest.mark.parametrize("keep", [0, 100, -1])  # empty, a torn header, cut in its tensors
def test_a_shard_cut_short_since_it_was_written_is_redone(tmp_path: Path, keep: int) -> None:
    write_shards(tmp_path / "data", n_shards=2, per_shard=3)
    out = tmp_path / "acts"
    extract(KeyRows(), open_source(str(tmp_path / "data")), out, "tiny")
    shard = out / "00000.safetensors"
    before = shard_metadata(shard), {k: v.clone() for k, v in load_file(shard).items()}
    shard.write_bytes(shard.read_bytes()[:keep])  # a broken copy, a bad disk
    written = extract(KeyRows(), open_source(str(tmp_path / "data")), out, "tiny")
    assert [p.name for p in written] == ["00000.safetensors"]
    (meta, tensors), after = before, (shard_metadata(shard), load_file(shard))
    assert after[0] == meta and all(torch.equal(after[1][k], v) for k, v in tensors.items())
    assert write_manifest(out, open_source(str(tmp_path / "data")))["complete"]


def stamp(tar: Path) -> str:
    """How a refusal names a data file: its resolved path, size and modification time."""
    from datetime import UTC, datetime

    stat = tar.stat()
    modified = datetime.fromtimestamp(stat.st_mtime_ns / 1e9, tz=UTC).isoformat()
    return f"{tar.resolve()} ({stat.st_size} bytes, modified {modified})"


def test_a_rerun_on_other_data_is_refused_and_the_same_data_resumes(tmp_path: Path) -> None:
    write_shards(tmp_path / "a", n_shards=2, per_shard=3)
    write_shards(tmp_path / "b", n_shards=2, per_shard=5)
    out = tmp_path / "acts"
    extract(KeyRows(), open_source(str(tmp_path / "a")), out, "tiny")
    old = stamp(tmp_path / "a" / "00000.tar")  # as its shard records it
    (out / "00001.safetensors").unlink()  # killed: the same data resumes at the missing part
    written = extract(KeyRows(), open_source(str(tmp_path / "a")), out, "tiny")
    assert [p.name for p in written] == ["00001.safetensors"]
    write_shards(tmp_path / "a", n_shards=2, per_shard=3)  # exported again, as it was
    os.utime(tmp_path / "a" / "00000.tar", ns=(0, 0))  # surely another modification time
    assert extract(KeyRows(), open_source(str(tmp_path / "a")), out, "tiny") == []
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    with pytest.raises(ValueError) as error:  # other data, same part names
        extract(KeyRows(), open_source(str(tmp_path / "b")), out, "tiny")
    assert str(error.value) == (
        f"{out} holds activations of other data: 00000.safetensors was extracted from {old}, "
        f"this run reads {stamp(tmp_path / 'b' / '00000.tar')}. Use a new --out folder, or "
        f"delete {out} to extract this data into it")
    write_shards(tmp_path / "a", n_shards=2, per_shard=4)  # the same folder, with more pairs
    with pytest.raises(ValueError) as error:
        extract(KeyRows(), open_source(str(tmp_path / "a")), out, "tiny")
    assert str(error.value) == (
        f"{out} holds activations of other data: 00000.safetensors was extracted from {old}, "
        f"this run reads {stamp(tmp_path / 'a' / '00000.tar')}. Use a new --out folder, or "
        f"delete {out} to extract this data into it")
    (tmp_path / "b" / "00000.tar").unlink()
    with pytest.raises(ValueError) as error:  # a part the data lacks: its shard would be kept
        extract(KeyRows(), open_source(str(tmp_path / "b")), out, "tiny")
    assert str(error.value) == (
        f"{out} holds activations of other data: 00000.safetensors (of {old}) is of a data part "
        f"this data does not have. Use a new --out folder, or delete {out} to extract this data "
        "into it")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched


def test_a_grown_table_is_other_data(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    table = tmp_path / "pairs.tsv"
    table.write_text("w1\t0.png\nw2\t0.png\n")
    out = tmp_path / "acts"
    extract(KeyRows(), open_source(str(table)), out, "tiny")
    old = stamp(table)
    table.write_text("w1\t0.png\nw2\t0.png\nw3\t0.png\n")
    with pytest.raises(ValueError) as error:
        extract(KeyRows(), open_source(str(table)), out, "tiny")
    assert str(error.value) == (
        f"{out} holds activations of other data: 00000.safetensors was extracted from {old} in "
        f"parts of 10000 rows, this run reads {stamp(table)} in parts of 10000 rows. Use a new "
        f"--out folder, or delete {out} to extract this data into it")


def test_an_out_holding_another_artifacts_manifest_is_refused(tmp_path: Path) -> None:
    write_shards(tmp_path / "data", n_shards=1, per_shard=2)
    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text('{"seed": 0, "shards": [], "pope": {}, "chair": {}}')
    refusal = (f"{export / 'manifest.json'} is not an extraction's manifest (no d_model in it; it "
               f"holds ['chair', 'pope', 'seed', 'shards']): extracting into {export} would "
               "overwrite it. Pick another --out")
    with pytest.raises(ValueError) as error:
        extract(KeyRows(), open_source(str(tmp_path / "data")), export, "tiny")
    assert str(error.value) == refusal
    with pytest.raises(SystemExit) as exit_info:  # the command: before its log goes in
        main(["extract", "--model", "m", "--data", str(tmp_path / "data"), "--out", str(export)])
    assert str(exit_info.value) == f"error: {refusal}"
    assert [p.name for p in export.iterdir()] == ["manifest.json"]


@pytest.mark.parametrize("field,value", [("model", "other"), ("site", "layer_output"),
                                         ("prompt", "Q: <image> {caption} A:"),
                                         ("codes_of", "space (sha256 0123456789abcdef)"),
                                         ("pool", "max_scores")])
def test_a_folder_of_one_shard_refuses_rows_of_another_kind(tmp_path: Path, field: str,
                                                            value: str) -> None:
    """Every identity field counts, and a folder's one shard is checked (not only a second)."""
    write_shards(tmp_path / "data", n_shards=1, per_shard=2)
    out = tmp_path / "acts"
    extract(KeyRows(), open_source(str(tmp_path / "data")), out, "tiny")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    other = KeyRows()
    model = value if field == "model" else "tiny"
    if field != "model":
        setattr(other, field, value)
    with pytest.raises(ValueError) as error:
        extract(other, open_source(str(tmp_path / "data")), out, model)
    assert str(error.value) == (f"{out} already holds activations of {KeyRows().info('tiny')}; "
                                f"this run would write {other.info(model)}. Use another output "
                                "folder.")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.parametrize("torn", [b'{"d_model": 4, "shar', b"\xff\xfe\x00garbled"])
def test_a_torn_manifest_in_out_is_rewritten(tmp_path: Path, torn: bytes) -> None:
    """Cut short while written, or garbled on disk (not even UTF-8)."""
    write_shards(tmp_path / "data", n_shards=1, per_shard=2)
    out = tmp_path / "acts"
    out.mkdir()
    (out / "manifest.json").write_bytes(torn)
    extract(KeyRows(), open_source(str(tmp_path / "data")), out, "tiny")
    assert write_manifest(out)["count"] == 2
    assert json.loads((out / "manifest.json").read_text())["count"] == 2
