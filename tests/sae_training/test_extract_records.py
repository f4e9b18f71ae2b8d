"""What extraction records: each shard's rows, captions, skips and dtype, the manifest's sums
and ``complete`` over processes and sample caps, and no shard at all for a write that failed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.extraction import KeyRows
from helpers.image_shards import caption_of, write_shard, write_shards

from sae_training.extract import SKIP_REPORT, extract, write_manifest
from sae_training.readers import open_source
from sae_training.store import ActivationStore, shard_metadata


def test_captions_follow_their_rows_across_batches(tmp_path: Path) -> None:
    keys = write_shards(tmp_path / "data", n_shards=1, per_shard=5)
    out = tmp_path / "acts"
    extract(KeyRows(), open_source(str(tmp_path / "data")), out, "tiny", batch_size=2)
    meta = shard_metadata(out / "00000.safetensors")
    assert meta["keys"] == keys
    assert meta["captions"] == [caption_of(i) for i in range(5)]
    write_manifest(out)
    vision, _ = ActivationStore(out).get(torch.arange(5))
    assert torch.equal(vision[:, 0], torch.arange(5.0))  # row i is key i's


def test_each_shard_records_its_own_skips_and_the_manifest_adds_them_up(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    write_shard(tmp_path / "data" / "00000.tar", 0, 3, corrupt=(1,))
    write_shard(tmp_path / "data" / "00001.tar", 3, 3, corrupt=(4,))
    out = tmp_path / "acts"
    extract(KeyRows(), open_source(str(tmp_path / "data")), out, "tiny")
    for name, key in (("00000", "000000001"), ("00001", "000000004")):
        info = shard_metadata(out / f"{name}.safetensors")["info"]
        assert info["skipped"] == 1
        assert [s["where"] for s in info["skips"]] == [f"{tmp_path / 'data' / name}.tar:{key}"]
    manifest = write_manifest(out, open_source(str(tmp_path / "data")))
    assert (manifest["count"], manifest["skipped"], manifest["complete"]) == (4, 2, True)
    report = [json.loads(line) for line in (out / SKIP_REPORT).read_text().splitlines()]
    assert [(r["shard"], r["reason"]) for r in report] == [("00000.safetensors", "undecodable"),
                                                           ("00001.safetensors", "undecodable")]


def test_complete_needs_every_part_whole_whichever_process_wrote_it(tmp_path: Path) -> None:
    write_shards(tmp_path / "data", n_shards=2, per_shard=4)
    out = tmp_path / "acts"

    def run(process: int, max_samples: int | None = None) -> list[str]:
        written = extract(KeyRows(), open_source(str(tmp_path / "data")), out, "tiny",
                          max_samples=max_samples, process_index=process, num_processes=2)
        return [p.name for p in written]

    def manifest() -> tuple[list[tuple[str, int]], bool]:
        found = write_manifest(out, open_source(str(tmp_path / "data")))
        return [(s["file"], s["count"]) for s in found["shards"]], found["complete"]

    assert run(1) == ["00001.safetensors"]
    assert manifest() == ([("00001.safetensors", 4)], False)  # process 0's part is missing
    assert run(0, max_samples=2) == ["00000.safetensors"]
    assert manifest() == ([("00000.safetensors", 2), ("00001.safetensors", 4)], False)
    # a cap as large as process 0's part: the other process's pairs do not count against it,
    # and a part that fills the cap exactly is whole
    assert run(0, max_samples=4) == ["00000.safetensors"]
    assert manifest() == ([("00000.safetensors", 4), ("00001.safetensors", 4)], True)
    assert not shard_metadata(out / "00000.safetensors")["info"]["truncated"]


def test_auto_save_dtype_keeps_the_rows_dtype(tmp_path: Path) -> None:
    write_shards(tmp_path / "data", n_shards=1, per_shard=3)
    out = tmp_path / "acts"
    extract(KeyRows(torch.bfloat16), open_source(str(tmp_path / "data")), out, "tiny")
    assert write_manifest(out)["dtype"] == "BF16"
    vision, text = ActivationStore(out).get(torch.arange(3))
    assert torch.equal(vision[:, 0], torch.arange(3.0)) and torch.equal(text, vision + 1)


def test_a_shard_write_that_fails_leaves_no_shard(tmp_path: Path, monkeypatch) -> None:
    """A run killed while writing: the part's shard is absent (not half written), so the next
    run redoes it."""

    write_shards(tmp_path / "data", n_shards=1, per_shard=3)
    out = tmp_path / "acts"

    def killed(tensors, filename, metadata):
        Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
        raise OSError("killed mid-write")

    monkeypatch.setattr("vlsae_hooks.tensor_files.save_file", killed)
    with pytest.raises(OSError, match="killed mid-write"):
        extract(KeyRows(), open_source(str(tmp_path / "data")), out, "tiny")
    assert not (out / "00000.safetensors").exists()
    monkeypatch.undo()
    written = extract(KeyRows(), open_source(str(tmp_path / "data")), out, "tiny")
    assert [p.name for p in written] == ["00000.safetensors"]


def test_a_part_without_usable_pairs_does_not_make_the_dtype_mixed(tmp_path: Path) -> None:
    """Its shard holds no rows (stored float32, as no batch told the dtype)."""
    (tmp_path / "data").mkdir()
    write_shard(tmp_path / "data" / "00000.tar", 0, 2)
    write_shard(tmp_path / "data" / "00001.tar", 2, 2, corrupt=(2, 3))
    out = tmp_path / "acts"
    extract(KeyRows(), open_source(str(tmp_path / "data")), out, "tiny", save_dtype="bfloat16")
    manifest = write_manifest(out)
    assert [s["count"] for s in manifest["shards"]] == [2, 0] and manifest["dtype"] == "BF16"
