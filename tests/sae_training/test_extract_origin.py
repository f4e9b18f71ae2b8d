"""The data origin a shard records: which changes to the data a resumed extraction refuses as
other data (a file of another size, other slicing, another file set), and which it takes for
the same data (a path named another way, a shard from before origins were recorded)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from helpers.extraction import KeyRows
from helpers.image_shards import jpeg_bytes, write_shard, write_shards

from sae_training.extract import extract
from sae_training.readers import open_source
from sae_training.store import shard_metadata
from sae_training.store import write_shard as write_rows


def refusal(out: Path) -> str:
    """How a refusal of other data starts."""
    return f"{out} holds activations of other data: 00000.safetensors was extracted from "


def test_a_tar_of_another_size_with_the_same_modification_time_is_other_data(
        tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    tar = tmp_path / "data" / "00000.tar"
    write_shard(tar, 0, 2)
    out = tmp_path / "acts"
    extract(KeyRows(), open_source(str(tar.parent)), out, "tiny")
    modified = tar.stat().st_mtime_ns
    write_shard(tar, 0, 3)  # one more pair, then the time stamp put back (a coarse clock)
    os.utime(tar, ns=(modified, modified))
    with pytest.raises(ValueError, match=refusal(out)):
        extract(KeyRows(), open_source(str(tar.parent)), out, "tiny")


def test_a_table_cut_into_parts_of_another_size_is_other_data(tmp_path: Path) -> None:
    (tmp_path / "0.png").write_bytes(jpeg_bytes(0))
    table = tmp_path / "pairs.tsv"
    table.write_text("".join(f"w{i}\t0.png\n" for i in range(4)))
    out = tmp_path / "acts"
    extract(KeyRows(), open_source(str(table), rows_per_part=2), out, "tiny")
    with pytest.raises(ValueError, match=refusal(out) + r".* in parts of 2 rows, this run reads "
                                                        r".* in parts of 3 rows\."):
        extract(KeyRows(), open_source(str(table), rows_per_part=3), out, "tiny")


def write_parquet(path: Path, start: int, n: int) -> None:
    import datasets

    datasets.Dataset.from_dict({"image": [{"bytes": jpeg_bytes(i), "path": None}
                                          for i in range(start, start + n)],
                                "caption": [f"w{i}" for i in range(start, start + n)]},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "caption": datasets.Value("string")})
                               ).to_parquet(str(path))


def test_a_parquet_folder_records_each_file_and_a_file_added_is_other_data(
        tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    write_parquet(tmp_path / "data" / "a.parquet", 0, 2)
    out = tmp_path / "acts"
    extract(KeyRows(), open_source(str(tmp_path / "data")), out, "tiny")
    files = shard_metadata(out / "00000.safetensors")["info"]["origin"]["files"]
    assert [f["file"] for f in files] == [str((tmp_path / "data" / "a.parquet").resolve())]
    write_parquet(tmp_path / "data" / "b.parquet", 2, 1)  # the first part now holds 3 rows
    with pytest.raises(ValueError, match=refusal(out)):
        extract(KeyRows(), open_source(str(tmp_path / "data")), out, "tiny")


def test_a_saved_dataset_records_its_arrow_files(tmp_path: Path) -> None:
    import datasets

    write_parquet(tmp_path / "a.parquet", 0, 2)
    datasets.Dataset.from_parquet(str(tmp_path / "a.parquet")).save_to_disk(tmp_path / "saved")
    out = tmp_path / "acts"
    extract(KeyRows(), open_source(str(tmp_path / "saved")), out, "tiny")
    files = shard_metadata(out / "00000.safetensors")["info"]["origin"]["files"]
    assert [Path(f["file"]).name for f in files] == ["data-00000-of-00001.arrow"]
    assert extract(KeyRows(), open_source(str(tmp_path / "saved")), out, "tiny") == []


def test_the_same_tars_named_by_a_relative_path_resume(tmp_path: Path, monkeypatch) -> None:
    write_shards(tmp_path / "data", n_shards=2, per_shard=2)
    out = tmp_path / "acts"
    monkeypatch.chdir(tmp_path)
    extract(KeyRows(), open_source("data"), out, "tiny")
    (out / "00001.safetensors").unlink()
    written = extract(KeyRows(), open_source(str(tmp_path / "data")), out, "tiny")
    assert [p.name for p in written] == ["00001.safetensors"]


def test_a_shard_without_a_recorded_origin_is_kept_with_a_warning(tmp_path: Path,
                                                                  caplog) -> None:
    """Shards of an extraction before origins were recorded: kept, not refused."""
    write_shards(tmp_path / "data", n_shards=2, per_shard=2)
    out = tmp_path / "acts"
    extract(KeyRows(), open_source(str(tmp_path / "data")), out, "tiny")
    meta = shard_metadata(out / "00000.safetensors")
    info = {k: v for k, v in meta["info"].items() if k != "origin"}
    write_rows(out / "00000.safetensors", *KeyRows()(list(open_source(
        str(tmp_path / "data")).parts()[0])), meta["keys"], meta["captions"], info)
    with caplog.at_level(logging.WARNING):
        assert extract(KeyRows(), open_source(str(tmp_path / "data")), out, "tiny") == []
    assert (f"00000.safetensors records no data origin (an extraction before origins were "
            f"recorded): kept as this data's {(tmp_path / 'data' / '00000.tar').resolve()} ("
            in caplog.text)
