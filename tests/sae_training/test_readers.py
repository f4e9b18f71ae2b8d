"""Readers on generated img2dataset shards (one corrupt, one truncated), a TSV and a parquet."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers.image_shards import caption_of, jpeg_bytes, write_shard, write_shards

from sae_training.readers import HFSource, TableSource, WebDatasetSource, open_source
from sae_training.samples import DataError


def test_webdataset_skips_and_counts_bad_samples(tmp_path: Path, caplog) -> None:
    keys0 = write_shard(tmp_path / "00000.tar", 0, 6, corrupt=(2,))
    keys1 = write_shard(tmp_path / "00001.tar", 6, 6)
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[: len(data) // 2 + 700])  # cut mid-member
    write_shard(tmp_path / "00002.tar", 12, 4)

    source = WebDatasetSource(str(tmp_path / "{00000..00002}.tar"))
    with caplog.at_level(logging.WARNING):
        samples = list(source)
    got = [s.key for s in samples]
    assert [p.name for p in source.parts()] == ["00000", "00001", "00002"]
    assert got[:5] == [k for k in keys0 if k != "000000002"]
    assert "000000002" not in got
    assert got[-4:] == [f"{i:09d}" for i in range(12, 16)]  # the shard after the truncated one
    n_from_truncated = len(got) - 5 - 4
    assert 0 < n_from_truncated < len(keys1)
    assert source.skipped.counts["undecodable"] == 1
    assert source.skipped.total >= 2  # the corrupt image and the truncated tar
    assert "skipped" in caplog.text
    first = samples[0]
    assert first.caption == caption_of(0) and first.image.mode == "RGB"
    assert first.image.size == (28, 24)


def test_webdataset_folder_and_list(tmp_path: Path) -> None:
    keys = write_shards(tmp_path / "shards", n_shards=2, per_shard=3)
    assert [s.key for s in open_source(str(tmp_path / "shards"))] == keys
    listed = WebDatasetSource([str(tmp_path / "shards" / "00001.tar")])
    assert [s.key for s in listed] == keys[3:]
    with pytest.raises(FileNotFoundError):
        WebDatasetSource(str(tmp_path / "nothing" / "*.tar"))


def test_tsv_with_and_without_header(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for i in range(5):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    (tmp_path / "img" / "3.jpg").write_bytes(b"broken")
    lines = [f"{caption_of(i)}\timg/{i}.jpg" for i in range(5)] + ["a caption\timg/missing.jpg"]
    (tmp_path / "cc3m.tsv").write_text("\n".join(lines) + "\n")
    source = open_source(str(tmp_path / "cc3m.tsv"), rows_per_part=4)
    assert isinstance(source, TableSource)
    samples = list(source)
    assert [s.caption for s in samples] == [caption_of(i) for i in (0, 1, 2, 4)]
    assert [(p.name, p.size) for p in source.parts()] == [("00000", 4), ("00001", 2)]
    assert source.skipped.counts["unreadable image"] == 2

    rows = ["id,image,caption"] + [f"k{i},img/{i}.jpg,{caption_of(i)}" for i in (0, 1)]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    keyed = TableSource(tmp_path / "pairs.csv", key_column="id")
    assert [(s.key, s.caption) for s in keyed] == [("k0", caption_of(0)), ("k1", caption_of(1))]
    with pytest.raises(ValueError, match="lacks the named columns"):
        TableSource(tmp_path / "cc3m.tsv", caption_column="title")


def test_tsv_captions_keep_their_quotes_and_short_rows_are_reported(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for i in range(4):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    captions = ['"Dream big" poster on a wall', 'a 12" record', "no image column", "a dog"]
    lines = [f"{captions[0]}\timg/0.jpg", f"{captions[1]}\timg/1.jpg", captions[2],
             f"{captions[3]}\timg/3.jpg"]
    (tmp_path / "cc3m.tsv").write_text("\n".join(lines) + "\n")
    source = TableSource(tmp_path / "cc3m.tsv")
    # an unbalanced quote ends no caption and swallows no row; the short row is skipped
    assert [(s.key, s.caption) for s in source] == [
        ("000000000", captions[0]), ("000000001", captions[1]), ("000000003", captions[3])]
    assert source.skipped.records == [{"where": f"{tmp_path / 'cc3m.tsv'}:3",
                                       "reason": "malformed row",
                                       "error": "1 column(s), 2 needed"}]


def test_tars_of_one_name_in_two_folders_are_refused(tmp_path: Path) -> None:
    write_shards(tmp_path / "cc3m", n_shards=1, per_shard=2)
    write_shards(tmp_path / "sbu", n_shards=1, per_shard=2)
    with pytest.raises(DataError, match=r"both named '00000'.*cc3m/00000.tar.*sbu/00000.tar"):
        open_source(str(tmp_path / "*" / "*.tar"))


def test_parquet_dataset(tmp_path: Path) -> None:
    import datasets

    images = [{"bytes": jpeg_bytes(i), "path": None} for i in range(6)]
    images[4] = {"bytes": b"garbage", "path": None}
    ds = datasets.Dataset.from_dict(
        {"image": images, "caption": [caption_of(i) for i in range(6)]},
        features=datasets.Features({"image": datasets.Image(),
                                    "caption": datasets.Value("string")}))
    ds.to_parquet(str(tmp_path / "train.parquet"))
    source = open_source(str(tmp_path / "train.parquet"), rows_per_part=4)
    assert isinstance(source, HFSource)
    samples = list(source)
    assert [s.caption for s in samples] == [caption_of(i) for i in (0, 1, 2, 3, 5)]
    assert samples[0].image.size == (28, 24)
    assert source.skipped.total == 1
    ds.save_to_disk(str(tmp_path / "saved"))
    assert len(list(open_source(str(tmp_path / "saved")))) == 5
