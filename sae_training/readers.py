"""Image-caption readers: img2dataset webdataset shards, a TSV/CSV table, a Hugging Face dataset.

Every source yields ``Sample(key, image, caption)`` and is cut into named ``Part``s (both in
``samples``; one part per tar shard, or runs of ``rows_per_part`` rows) so that extraction can
split work across processes and resume part by part. A bad sample (undecodable or truncated
image, missing caption, unreadable tar member) is skipped, counted in ``source.skipped`` and
logged; it never stops an epoch. A part that cannot be read whole (a cut, corrupt or empty tar)
is also named in ``source.damaged``, so extraction can refuse to call it finished.

``pipe:`` specs run a shell command and URLs fetch from the network: both are refused unless the
caller passes ``allow_remote=True`` (a recorded manifest must not run commands on its reader).
"""

from __future__ import annotations

import csv
import glob
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from sae_training.file_stamps import file_stamp
from sae_training.samples import Part, Sample, Source, decode_image, refuse_remote
from sae_training.tar_shards import check_part_names, ends_whole, expand_urls, part_name

CAPTION_COLUMNS = ("caption", "text", "txt")
IMAGE_COLUMNS = ("image", "jpg", "img", "image_path", "filepath", "path")


class WebDatasetSource(Source):
    """img2dataset output: ``NNNNN.tar`` holding ``<key>.jpg``, ``<key>.txt``, ``<key>.json``.

    ``urls`` is a folder of ``.tar`` files, a brace pattern (``shards/{00000..00099}.tar``), a
    glob, or a list of any of these. Tar-level errors (truncated or corrupt files) end that shard,
    are counted and mark it damaged; the remaining shards are still read.
    """

    def __init__(self, urls: str | Sequence[str], allow_remote: bool = False) -> None:
        super().__init__()
        self.urls = expand_urls(urls, allow_remote)
        check_part_names(self.urls)

    def parts(self) -> list[Part]:
        return [Part(part_name(url), lambda url=url: self._read(url), file=url)
                for url in self.urls]

    def origin(self, part: Part) -> dict:
        return {"files": [file_stamp(part.file)]}

    def _on_error(self, url: str) -> Callable[[Exception], bool]:
        """webdataset's handler hook: record the error, mark the shard damaged, go on. A cut
        member's error comes twice in a row (from its read, then the next header's): recorded
        once."""
        last = None

        def handler(error: Exception) -> bool:
            nonlocal last
            first = error.args[0] if error.args else ""
            message = first.split(" @ ")[0] if isinstance(first, str) else str(error)
            message = f"{type(error).__name__}: {message}"
            if message != last:
                self.skipped("tar error", url, message)
                self.damaged.setdefault(part_name(url), f"unreadable tar ({message})")
            last = message
            return True
        return handler

    def _read(self, url: str) -> Iterator[Sample]:
        name = part_name(url)
        self.damaged.pop(name, None)
        handler = self._on_error(url)
        try:
            stream = wds.gopen(url)
        except Exception as error:  # as webdataset's url_opener: any open error is the shard's
            handler(error)
            return
        with stream:  # closed here, not left to the garbage collector as webdataset leaves it
            files = tar_file_expander([{"url": url, "stream": stream}], handler=handler)
            yield from self._samples(url, group_by_keys(files, handler=handler))
        if name not in self.damaged and Path(url).is_file() and not ends_whole(Path(url)):
            self.damaged[name] = "the tar ends without its end-of-archive marker (cut short)"
            self.skipped("cut tar", url, self.damaged[name])

    def _samples(self, url: str, raws: Iterator[dict]) -> Iterator[Sample]:
        """The decodable samples among a shard's grouped members; the rest counted."""
        for raw in raws:
            key = raw["__key__"]
            image_bytes = next((raw[ext] for ext in ("jpg", "jpeg", "png", "webp") if ext in raw),
                               None)
            if image_bytes is None or "txt" not in raw:
                self.skipped("missing image or caption", f"{url}:{key}")
                continue
            try:
                image = decode_image(image_bytes)
                caption = raw["txt"].decode("utf-8").strip()
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
                self.skipped("undecodable", f"{url}:{key}", error)
                continue
            yield Sample(key, image, caption)


class _RowSource(Source):
    """Sources with random access to rows: cut into parts of ``rows_per_part`` rows."""

    def __init__(self, rows_per_part: int) -> None:
        super().__init__()
        if rows_per_part <= 0:
            raise ValueError(f"rows_per_part must be positive, got {rows_per_part}")
        self.rows_per_part = rows_per_part
        self.files: list[str] = []
        """The files the rows are read from (or the name of a hub dataset)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def _sample(self, row: int) -> Sample | None:
        raise NotImplementedError

    def parts(self) -> list[Part]:
        n, size = len(self), self.rows_per_part
        return [Part(f"{start // size:05d}", lambda start=start: self._read(start),
                     min(size, n - start)) for start in range(0, n, size)]

    def origin(self, part: Part) -> dict:
        """Every part is a slice of the same files: any change to them, or to the slicing,
        may change what a part holds."""
        return {"files": [file_stamp(f) for f in self.files], "rows_per_part": self.rows_per_part}

    def _read(self, start: int) -> Iterator[Sample]:
        for row in range(start, min(start + self.rows_per_part, len(self))):
            sample = self._sample(row)
            if sample is not None:
                yield sample


class TableSource(_RowSource):
    """A TSV/CSV of caption + image path (paths relative to the table's folder).

    With a header row, columns are found by name (``caption_column``/``image_column``, or the
    usual names); without one, the CC3M layout is assumed: caption first, image second. A
    ``.tsv`` is read without quoting (CC3M's captions hold quote marks: a caption is the text
    between the tabs); a ``.csv`` with it. A row with too few columns is skipped and reported.
    """

    def __init__(self, path: str | Path, caption_column: str | None = None,
                 image_column: str | None = None, key_column: str | None = None,
                 rows_per_part: int = 10_000) -> None:
        super().__init__(rows_per_part)
        self.path = Path(path)
        self.files = [str(self.path)]
        dialect = ({"delimiter": ","} if self.path.suffix.lower() == ".csv"
                   else {"delimiter": "\t", "quoting": csv.QUOTE_NONE})
        with self.path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, **dialect))
        if not rows:
            raise ValueError(f"{self.path} is empty")
        header = [h.strip() for h in rows[0]]
        caption_col = _pick(header, caption_column, CAPTION_COLUMNS)
        image_col = _pick(header, image_column, IMAGE_COLUMNS)
        first_line = 1
        if caption_col is not None and image_col is not None and (not key_column
                                                                  or key_column in header):
            rows, first_line = rows[1:], 2
            key_col = header.index(key_column) if key_column else None
        elif caption_column or image_column or key_column:
            raise ValueError(f"{self.path}: header {header} lacks the named columns")
        else:
            caption_col, image_col, key_col = 0, 1, None
        self.columns = (caption_col, image_col, key_col)
        self.first_line = first_line
        """The line of the first data row: a skipped row is reported by its line."""
        self.rows = [(i, r) for i, r in enumerate(rows) if r]
        """(data row number, cells) of each non-empty row; the number keys a row without a key
        column."""
        self.root = self.path.parent

    def __len__(self) -> int:
        return len(self.rows)

    def _sample(self, row: int) -> Sample | None:
        number, cells = self.rows[row]
        caption_col, image_col, key_col = self.columns
        needed = max(c for c in self.columns if c is not None) + 1
        if len(cells) < needed:
            self.skipped("malformed row", f"{self.path}:{self.first_line + number}",
                         f"{len(cells)} column(s), {needed} needed")
            return None
        key = cells[key_col] if key_col is not None else f"{number:09d}"
        caption, image_path = cells[caption_col], cells[image_col]
        try:
            return Sample(key, decode_image(self.root / image_path), caption.strip())
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            self.skipped("unreadable image", f"{self.path}:{key}", error)
            return None


def _pick(header: list[str], wanted: str | None, usual: tuple[str, ...]) -> int | None:
    names = [wanted] if wanted else list(usual)
    return next((header.index(n) for n in names if n in header), None)


class HFSource(_RowSource):
    """A Hugging Face ``datasets`` dataset with an image column and a caption column.

    ``path``: a folder written by ``save_to_disk``, parquet file(s) (path or glob), or a dataset
    name for ``load_dataset``. The image column may hold ``Image`` features, raw bytes, ``{"bytes":
    ...}`` dicts or file paths.
    """

    def __init__(self, path: str | Path, split: str = "train", caption_column: str | None = None,
                 image_column: str | None = None, key_column: str | None = None,
                 rows_per_part: int = 10_000) -> None:
        super().__init__(rows_per_part)
        import datasets

        path = str(path)
        if Path(path).is_dir() and (Path(path) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(path)
            self.files = sorted(str(f) for f in Path(path).rglob("data-*.arrow"))
        elif path.endswith(".parquet") or Path(path).is_dir():
            files = path if path.endswith(".parquet") else f"{path}/*.parquet"
            ds = datasets.load_dataset("parquet", data_files={split: files})
            self.files = sorted(glob.glob(files))
        else:
            ds = datasets.load_dataset(path)
            self.files = [path]
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        columns = list(ds.column_names)
        caption_idx = _pick(columns, caption_column, CAPTION_COLUMNS)
        image_idx = _pick(columns, image_column, IMAGE_COLUMNS)
        if caption_idx is None or image_idx is None:
            raise ValueError(f"{path}: cannot find caption/image columns among {columns}; "
                             "name them with caption_column/image_column")
        if key_column and key_column not in columns:
            raise ValueError(f"{path}: no key column {key_column!r} among {columns}")
        self.caption_column, self.image_column = columns[caption_idx], columns[image_idx]
        self.key_column = key_column
        if isinstance(ds.features.get(self.image_column), datasets.Image):
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        self.ds, self.name = ds, path

    def __len__(self) -> int:
        return len(self.ds)

    def _sample(self, row: int) -> Sample | None:
        record = self.ds[row]
        key = str(record[self.key_column]) if self.key_column else f"{row:09d}"
        value = record[self.image_column]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        try:
            if value is None:
                raise ValueError("empty image cell")
            return Sample(key, decode_image(value), str(record[self.caption_column]).strip())
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            self.skipped("unreadable image", f"{self.name}:{key}", error)
            return None


def open_source(spec: str | Sequence[str], allow_remote: bool = False, **kwargs) -> Source:
    """Pick the reader from the path: ``.tsv``/``.csv`` -> table, ``hf:NAME``, ``.parquet`` or a
    ``save_to_disk`` folder -> datasets, anything else (tars, folders of tars, brace patterns) ->
    webdataset. ``kwargs`` go to the reader (column names, ``rows_per_part``, ``split``).
    ``pipe:`` commands and URLs are refused unless ``allow_remote``."""
    if not isinstance(spec, str):
        return WebDatasetSource(spec, allow_remote)
    refuse_remote(spec, allow_remote)
    path = Path(spec)
    if path.suffix.lower() in (".tsv", ".csv", ".parquet") and not any(c in spec for c in "*?[")\
            and not path.exists():
        raise FileNotFoundError(f"data {spec!r} does not exist; check the path")
    if path.suffix.lower() in (".tsv", ".csv"):
        return TableSource(path, **kwargs)
    if spec.startswith("hf:"):
        return HFSource(spec[3:], **kwargs)
    if spec.endswith(".parquet") or (path.is_dir() and (any(path.glob("*.parquet")) or
                                                       (path / "dataset_info.json").exists())):
        return HFSource(spec, **kwargs)
    if kwargs:
        raise ValueError(f"webdataset shards take no reader options, got {sorted(kwargs)}")
    return WebDatasetSource(spec, allow_remote)
