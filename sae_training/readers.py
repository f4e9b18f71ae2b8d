"""Image-caption readers: img2dataset webdataset shards, a TSV/CSV table, a Hugging Face dataset.

Every source yields ``Sample(key, image, caption)`` and is cut into named ``Part``s (one per tar
shard, or runs of ``rows_per_part`` rows) so that extraction can split work across processes and
resume part by part. A bad sample (undecodable or truncated image, missing caption, unreadable
tar member) is skipped, counted in ``source.skipped`` and logged; it never stops an epoch.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import webdataset as wds
from PIL import Image

log = logging.getLogger(__name__)

CAPTION_COLUMNS = ("caption", "text", "txt")
IMAGE_COLUMNS = ("image", "jpg", "img", "image_path", "filepath", "path")


@dataclass(frozen=True)
class Sample:
    key: str
    image: Image.Image
    caption: str


@dataclass(frozen=True)
class Part:
    """A named, independently readable slice of a source (the unit of resume and sharding)."""

    name: str
    read: Callable[[], Iterator[Sample]]
    size: int | None = None
    """Number of rows, when known without reading."""

    def __iter__(self) -> Iterator[Sample]:
        return self.read()


class SkipLog:
    """Counts skipped samples by reason; logs the first few of each reason as warnings."""

    def __init__(self, warn_first: int = 5) -> None:
        self.counts: Counter[str] = Counter()
        self.warn_first = warn_first

    def __call__(self, reason: str, where: str, error: object = "") -> None:
        self.counts[reason] += 1
        level = logging.WARNING if self.counts[reason] <= self.warn_first else logging.DEBUG
        log.log(level, "skipped %s (%s) %s", where, reason, error)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def decode_image(data: bytes | str | Path | Image.Image) -> Image.Image:
    """Fully decode (so truncation shows up here, not later) and convert to RGB."""
    if isinstance(data, Image.Image):
        image = data
    else:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    image.load()
    return image.convert("RGB")


class Source:
    """Base class: ``parts()`` plus iteration over all samples in order."""

    def __init__(self) -> None:
        self.skipped = SkipLog()

    def parts(self) -> list[Part]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Sample]:
        for part in self.parts():
            yield from part


class WebDatasetSource(Source):
    """img2dataset output: ``NNNNN.tar`` holding ``<key>.jpg``, ``<key>.txt``, ``<key>.json``.

    ``urls`` is a folder of ``.tar`` files, a brace pattern (``shards/{00000..00099}.tar``), a
    glob, or a list of any of these. Tar-level errors (truncated or corrupt files) end that shard
    and are counted; the remaining shards are still read.
    """

    def __init__(self, urls: str | Sequence[str]) -> None:
        super().__init__()
        self.urls = expand_urls(urls)
        if not self.urls:
            raise FileNotFoundError(f"no .tar shards found for {urls!r}")

    def parts(self) -> list[Part]:
        return [Part(Path(url).name.removesuffix(".tar"), lambda url=url: self._read(url))
                for url in self.urls]

    def _on_error(self, url: str) -> Callable[[Exception], bool]:
        def handler(error: Exception) -> bool:
            self.skipped("tar error", url, error)
            return True
        return handler

    def _read(self, url: str) -> Iterator[Sample]:
        for raw in wds.tarfile_samples([{"url": url}], handler=self._on_error(url)):
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


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Folder -> its sorted ``*.tar``; brace patterns and globs expanded; order kept."""
    out: list[str] = []
    for spec in [urls] if isinstance(urls, (str, Path)) else urls:
        for item in braceexpand.braceexpand(str(spec)):
            if Path(item).is_dir():
                out += sorted(str(p) for p in Path(item).glob("*.tar"))
            elif any(c in item for c in "*?[") and not item.startswith(("pipe:", "http")):
                out += sorted(glob.glob(item))
            else:
                out.append(item)
    return out


class _RowSource(Source):
    """Sources with random access to rows: cut into parts of ``rows_per_part`` rows."""

    def __init__(self, rows_per_part: int) -> None:
        super().__init__()
        if rows_per_part <= 0:
            raise ValueError(f"rows_per_part must be positive, got {rows_per_part}")
        self.rows_per_part = rows_per_part

    def __len__(self) -> int:
        raise NotImplementedError

    def _sample(self, row: int) -> Sample | None:
        raise NotImplementedError

    def parts(self) -> list[Part]:
        n, size = len(self), self.rows_per_part
        return [Part(f"{start // size:05d}", lambda start=start: self._read(start),
                     min(size, n - start)) for start in range(0, n, size)]

    def _read(self, start: int) -> Iterator[Sample]:
        for row in range(start, min(start + self.rows_per_part, len(self))):
            sample = self._sample(row)
            if sample is not None:
                yield sample


class TableSource(_RowSource):
    """A TSV/CSV of caption + image path (paths relative to the table's folder).

    With a header row, columns are found by name (``caption_column``/``image_column``, or the
    usual names); without one, the CC3M layout is assumed: caption first, image second.
    """

    def __init__(self, path: str | Path, caption_column: str | None = None,
                 image_column: str | None = None, key_column: str | None = None,
                 rows_per_part: int = 10_000) -> None:
        super().__init__(rows_per_part)
        self.path = Path(path)
        delimiter = "," if self.path.suffix.lower() == ".csv" else "\t"
        with self.path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter=delimiter))
        if not rows:
            raise ValueError(f"{self.path} is empty")
        header = [h.strip() for h in rows[0]]
        caption_col = _pick(header, caption_column, CAPTION_COLUMNS)
        image_col = _pick(header, image_column, IMAGE_COLUMNS)
        if caption_col is not None and image_col is not None:
            rows = rows[1:]
            key_col = header.index(key_column) if key_column else None
        elif caption_column or image_column or key_column:
            raise ValueError(f"{self.path}: header {header} lacks the named columns")
        else:
            caption_col, image_col, key_col = 0, 1, None
        self.rows = [(r[key_col] if key_col is not None else f"{i:09d}", r[caption_col],
                      r[image_col]) for i, r in enumerate(rows) if r]
        self.root = self.path.parent

    def __len__(self) -> int:
        return len(self.rows)

    def _sample(self, row: int) -> Sample | None:
        key, caption, image_path = self.rows[row]
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
        elif path.endswith(".parquet") or Path(path).is_dir():
            files = path if path.endswith(".parquet") else f"{path}/*.parquet"
            ds = datasets.load_dataset("parquet", data_files={split: files})
        else:
            ds = datasets.load_dataset(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        columns = list(ds.column_names)
        caption_idx = _pick(columns, caption_column, CAPTION_COLUMNS)
        image_idx = _pick(columns, image_column, IMAGE_COLUMNS)
        if caption_idx is None or image_idx is None:
            raise ValueError(f"{path}: cannot find caption/image columns among {columns}; "
                             "name them with caption_column/image_column")
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


def open_source(spec: str | Sequence[str], **kwargs) -> Source:
    """Pick the reader from the path: ``.tsv``/``.csv`` -> table, ``hf:NAME``, ``.parquet`` or a
    ``save_to_disk`` folder -> datasets, anything else (tars, folders of tars, brace patterns) ->
    webdataset. ``kwargs`` go to the reader (column names, ``rows_per_part``, ``split``)."""
    if not isinstance(spec, str):
        return WebDatasetSource(spec)
    path = Path(spec)
    if path.suffix.lower() in (".tsv", ".csv"):
        return TableSource(path, **kwargs)
    if spec.startswith("hf:"):
        return HFSource(spec[3:], **kwargs)
    if spec.endswith(".parquet") or (path.is_dir() and (any(path.glob("*.parquet")) or
                                                       (path / "dataset_info.json").exists())):
        return HFSource(spec, **kwargs)
    if kwargs:
        raise ValueError(f"webdataset shards take no reader options, got {sorted(kwargs)}")
    return WebDatasetSource(spec)
