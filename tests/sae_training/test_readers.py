"""Readers on generated img2dataset shards (one corrupt, one truncated), a TSV and a parquet."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from helpers.image_shards import caption_of, jpeg_bytes, write_shard, write_shards, write_tar
from PIL import Image

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


def test_png_members_are_read_and_captions_stripped(tmp_path: Path) -> None:
    image = io.BytesIO()
    Image.new("RGB", (5, 3), (7, 8, 9)).save(image, format="PNG")
    write_tar(tmp_path / "00000.tar", [("a.png", image.getvalue()), ("a.txt", b" a dog \n")])
    [sample] = list(open_source(str(tmp_path)))
    assert (sample.key, sample.caption, sample.image.getpixel((4, 2))) == ("a", "a dog", (7, 8, 9))


@pytest.mark.parametrize("kind,reason", [
    ("end padding cut", "the tar ends without its end-of-archive marker (cut short)"),
    ("one zero block", "the tar ends without its end-of-archive marker (cut short)"),
    ("empty", "unreadable tar (ReadError: empty file)")])
def test_a_damaged_tar_is_named_with_its_reason(tmp_path: Path, kind: str, reason: str) -> None:
    tar = tmp_path / "00000.tar"
    write_shard(tar, 0, 2)
    whole = tar.read_bytes()
    tar.write_bytes({"end padding cut": whole[:-100], "one zero block": bytes(512),
                     "empty": b""}[kind])
    source = open_source(str(tmp_path))
    keys = [s.key for s in source]
    assert keys == (["000000000", "000000001"] if kind == "end padding cut" else [])
    assert source.damaged == {"00000": reason}


def test_a_duplicated_member_is_reported_and_the_rest_of_the_tar_read(tmp_path: Path) -> None:
    write_tar(tmp_path / "00000.tar", [("a.jpg", jpeg_bytes(0)), ("a.txt", b"w0"),
                                       ("a.txt", b"w0 again"), ("b.jpg", jpeg_bytes(1)),
                                       ("b.txt", b"w1")])
    source = open_source(str(tmp_path))
    assert [(s.key, s.caption) for s in source] == [("a", "w0"), ("b", "w1")]
    assert [r["reason"] for r in source.skipped.records] == ["tar error"]
    assert source.damaged["00000"].startswith("unreadable tar (ValueError: a.txt: duplicate")


def test_a_part_read_again_after_a_repair_is_no_longer_damaged(tmp_path: Path) -> None:
    tar = tmp_path / "00000.tar"
    write_shard(tar, 0, 3)
    whole = tar.read_bytes()
    tar.write_bytes(whole[: len(whole) // 2])
    source = open_source(str(tmp_path))
    [part] = source.parts()
    list(part)
    assert "00000" in source.damaged
    tar.write_bytes(whole)
    assert len(list(part)) == 3 and source.damaged == {}


def test_tars_take_no_reader_options(tmp_path: Path) -> None:
    write_shards(tmp_path, n_shards=1, per_shard=1)
    with pytest.raises(ValueError, match=r"webdataset shards take no reader options, got "
                                         r"\['caption_column'\]"):
        open_source(str(tmp_path), caption_column="alt")


def test_a_tar_cut_inside_a_member_is_one_tar_error(tmp_path: Path) -> None:
    """webdataset hands the cut to the handler twice (the member's read, then the next
    header's): one error in the data, one line in the skip report."""
    tar = tmp_path / "00000.tar"
    write_shard(tar, 0, 2)
    tar.write_bytes(tar.read_bytes()[:1000])  # inside the first image (bytes 512 to 1627)
    source = open_source(str(tmp_path))
    assert list(source) == []
    assert source.skipped.records == [{"where": str(tar), "reason": "tar error",
                                       "error": "ReadError: unexpected end of data"}]
    assert source.damaged == {"00000": "unreadable tar (ReadError: unexpected end of data)"}


def test_a_tar_gone_before_its_read_is_damaged_and_the_others_are_read(tmp_path: Path) -> None:
    write_shards(tmp_path, n_shards=2, per_shard=2)
    source = open_source(str(tmp_path))
    (tmp_path / "00000.tar").unlink()
    assert len(list(source)) == 2
    assert source.damaged == {"00000": "unreadable tar (FileNotFoundError: [Errno 2] No such file "
                                       f"or directory: '{tmp_path / '00000.tar'}')"}


def test_a_shard_file_is_closed_when_read_through_and_when_its_reader_stops(
        tmp_path: Path, monkeypatch) -> None:
    write_shards(tmp_path, n_shards=1, per_shard=3)
    opened = []

    def gopen(url: str):
        opened.append(open(url, "rb"))
        return opened[-1]

    monkeypatch.setattr("sae_training.readers.wds.gopen", gopen)
    [part] = open_source(str(tmp_path)).parts()
    assert len(list(part)) == 3
    reader = iter(part)
    next(reader)
    assert [f.closed for f in opened] == [True, False]
    reader.close()
    assert [f.closed for f in opened] == [True, True]
