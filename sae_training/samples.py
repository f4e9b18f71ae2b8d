"""What every image-caption reader yields, whatever the format: ``Sample``s, grouped into named
``Part``s (the unit extraction resumes and shards by), the ``SkipLog`` of bad samples,
``DataError`` for input that cannot be used as given, and ``refuse_remote`` for specs that would
run a command or reach the network. The readers are in ``readers``."""

from __future__ import annotations

import io
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)
_URL = re.compile(r"^(?!file://)[a-zA-Z][a-zA-Z0-9+.-]*://")


class DataError(ValueError):
    """Input data that cannot be used as given; the message says what to do about it."""


def is_remote(spec: str) -> bool:
    """``pipe:`` runs a shell command; a URL (http, https, s3, ...) fetches over the network."""
    return spec.startswith("pipe:") or _URL.match(spec) is not None


def refuse_remote(spec: str, allow_remote: bool) -> None:
    """Raise unless ``spec`` is local data or the user opted in to remote / piped data."""
    if allow_remote or not is_remote(spec):
        return
    what = "runs a shell command" if spec.startswith("pipe:") else "is a remote URL"
    raise DataError(f"data {spec!r} {what}; refused by default. If you trust it, pass "
                    "--allow-remote-data (allow_remote=True); otherwise give a local path.")


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

