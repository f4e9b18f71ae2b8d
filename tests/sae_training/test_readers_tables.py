"""Table (TSV/CSV) and datasets (parquet) readers: which column is read, how rows are keyed and
numbered, and how a bad option or path is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sae_training.readers import HFSource, TableSource, open_source


def red_image(path: Path, red: int) -> None:
    """A 4 x 4 PNG of one colour: its red value tells which file a sample was read from."""
    Image.new("RGB", (4, 4), (red, 0, 0)).save(path)


def test_a_blank_line_is_no_row_and_later_rows_keep_their_numbers(tmp_path: Path) -> None:
    red_image(tmp_path / "0.png", 0)
    (tmp_path / "cc3m.tsv").write_text("w0\t0.png\n\nw2\t0.png\n")
    source = open_source(str(tmp_path / "cc3m.tsv"))
    assert [(s.key, s.caption) for s in source] == [("000000000", "w0"), ("000000002", "w2")]
    assert [p.size for p in source.parts()] == [2] and source.skipped.total == 0


def test_a_header_with_spaces_names_its_columns_and_skips_count_its_line(tmp_path: Path) -> None:
    red_image(tmp_path / "0.png", 0)
    (tmp_path / "pairs.csv").write_text("caption, image\n a dog ,0.png\nno image\n")
    source = open_source(str(tmp_path / "pairs.csv"))
    assert [(s.key, s.caption) for s in source] == [("000000000", "a dog")]
    assert source.skipped.records == [{"where": f"{tmp_path / 'pairs.csv'}:3",
                                       "reason": "malformed row",
                                       "error": "1 column(s), 2 needed"}]


def test_named_columns_win_over_the_usual_ones(tmp_path: Path) -> None:
    for i in range(3):
        red_image(tmp_path / f"{i}.png", 10 * i)
    rows = ["caption,image,alt,photo,id", "plain,0.png,alt 0,1.png,k0", "plain,0.png,alt 1,2.png"]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    source = TableSource(tmp_path / "pairs.csv", caption_column="alt", image_column="photo",
                         key_column="id")
    [sample] = list(source)
    assert (sample.key, sample.caption, sample.image.getpixel((0, 0))) == ("k0", "alt 0",
                                                                           (10, 0, 0))
    assert source.skipped.records[0]["error"] == "4 column(s), 5 needed"  # no key: skipped
    for option in ("caption_column", "image_column", "key_column"):
        with pytest.raises(ValueError, match="lacks the named columns"):
            TableSource(tmp_path / "pairs.csv", **{option: "title"})


def test_an_upper_case_csv_is_read_as_csv(tmp_path: Path) -> None:
    red_image(tmp_path / "0.png", 0)
    (tmp_path / "PAIRS.CSV").write_text('caption,image\n"a dog, a cat",0.png\n')
    assert [s.caption for s in open_source(str(tmp_path / "PAIRS.CSV"))] == ["a dog, a cat"]


def test_dataset_columns_keys_and_image_paths_are_read(tmp_path: Path) -> None:
    import datasets

    for i in range(3):
        red_image(tmp_path / f"{i}.png", 10 * i)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "photo": datasets.Image(), "alt": datasets.Value("string"),
                                  "id": datasets.Value("string")})
    datasets.Dataset.from_dict({
        "image": [{"bytes": None, "path": str(tmp_path / "0.png")}] * 2,
        "caption": ["plain", "plain"],
        "photo": [{"bytes": None, "path": str(tmp_path / f"{i}.png")} for i in (1, 2)],
        "alt": [" alt 0 ", "alt 1"], "id": ["k0", "k1"]}, features=features,
    ).to_parquet(str(tmp_path / "pairs.parquet"))  # images stored as paths
    source = open_source(str(tmp_path / "pairs.parquet"), caption_column="alt",
                         image_column="photo", key_column="id")
    assert isinstance(source, HFSource)
    assert [(s.key, s.caption, s.image.getpixel((0, 0))) for s in source] == [
        ("k0", "alt 0", (10, 0, 0)), ("k1", "alt 1", (20, 0, 0))]
    with pytest.raises(ValueError) as error:  # when opened, not at the first row read
        HFSource(tmp_path / "pairs.parquet", key_column="uid")
    assert str(error.value) == (f"{tmp_path / 'pairs.parquet'}: no key column 'uid' among "
                                f"{list(features)}")


def test_rows_per_part_must_be_positive(tmp_path: Path) -> None:
    (tmp_path / "pairs.tsv").write_text("w0\t0.png\n")
    with pytest.raises(ValueError, match="rows_per_part must be positive, got 0"):
        TableSource(tmp_path / "pairs.tsv", rows_per_part=0)


@pytest.mark.parametrize("name", ["missing.tsv", "missing.parquet"])
def test_a_missing_table_is_named_as_the_data(tmp_path: Path, name: str) -> None:
    with pytest.raises(FileNotFoundError) as error:
        open_source(str(tmp_path / name))
    assert str(error.value) == f"data {str(tmp_path / name)!r} does not exist; check the path"
