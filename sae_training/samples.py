"""What every image-caption reader yields, whatever the format: ``Sample``s, grouped into named
``Part``s (the unit extraction resumes and shards by), the ``SkipLog`` of bad samples, and
``DataError`` for input that cannot be used as given. The readers are in ``readers``."""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Input data that cannot be used as given; the message says what to do about it."""


@dataclass(frozen=True)
class Sample:
    """One image-caption pair."""

    key: str
    """Its name in the data (a tar member's key, a row's key or number)."""
    image: Image.Image
    """Decoded, RGB."""
    caption: str
    """Stripped of surrounding white space."""


@dataclass(frozen=True)
class Part:
    """A named, independently readable slice of a source (the unit of resume and sharding)."""

    name: str
    read: Callable[[], Iterator[Sample]]
    size: int | None = None
    """Number of rows, when known without reading."""
    file: str | None = None
    """The file (or URL) the part is read from, named in error messages."""

    def __iter__(self) -> Iterator[Sample]:
        return self.read()


class SkipLog:
    """Counts skipped samples by reason; logs the first few of each reason as warnings and
    keeps every one in ``records`` (for the report extraction writes)."""

    def __init__(self, warn_first: int = 5) -> None:
        self.counts: Counter[str] = Counter()
        self.records: list[dict[str, str]] = []
        self.warn_first = warn_first

    def __call__(self, reason: str, where: str, error: object = "") -> None:
        self.counts[reason] += 1
        self.records.append({"where": where, "reason": reason, "error": str(error)})
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
        self.damaged: dict[str, str] = {}
        """Part name -> why it could not be read whole (set while the part is read)."""

    def parts(self) -> list[Part]:
        raise NotImplementedError

    def origin(self, part: Part) -> dict:
        """What ``part`` is read from (files, with size and modification time): recorded in its
        shard, so a resumed extraction can tell the data it started on from changed data."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Sample]:
        for part in self.parts():
            yield from part

