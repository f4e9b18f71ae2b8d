"""What a data file was when it was read: cheap stamps (path, size, modification time) and,
once per version of a file, its content hash; an extraction records them so that a rerun can
tell the data it started on from changed data."""

from __future__ import annotations

import functools
import hashlib
from datetime import UTC, datetime
from pathlib import Path


def file_stamp(spec: str) -> dict:
    """A data file's resolved path, size and modification time: cheap to read, and changed when
    the file is rewritten or regenerated. A URL, command or hub name is recorded as it is."""
    path = Path(spec)
    if not path.exists():  # a URL, a pipe: command or a hub dataset name
        return {"file": spec}
    stat = path.stat()
    modified = datetime.fromtimestamp(stat.st_mtime_ns / 1e9, tz=UTC)
    return {"file": str(path.resolve()), "size": stat.st_size, "modified": modified.isoformat()}


@functools.cache
def file_sha256(path: str, size: int, modified: str) -> str:
    """The content hash of a data file, once per version of it (``size``, ``modified``): tells a
    file regenerated with the same content (a deterministic export run again) from new data."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
