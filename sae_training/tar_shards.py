"""Which tar shards a webdataset spec names (a folder's ``*.tar``, brace patterns and globs
expanded, every local file checked to exist; ``pipe:`` commands and URLs only when the caller
allows remote data), the part each tar is read as (its file name, unique among them), and
whether a tar ends whole (one cut short by an interrupted download reads without complaint).
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

import braceexpand

from sae_training.samples import DataError, is_remote, refuse_remote


def part_name(url: str) -> str:
    """The part a tar is read as, and its shard saved under: its file name without ``.tar``."""
    return Path(url).name.removesuffix(".tar")


def check_part_names(urls: list[str]) -> None:
    """Each tar's shard is named after it (``00000.tar`` -> ``00000.safetensors``): two tars of
    one name (``cc3m/00000.tar``, ``sbu/00000.tar``) would write one shard over the other."""
    first: dict[str, str] = {}
    for url in urls:
        name = part_name(url)
        if name in first:
            raise DataError(f"two data parts are both named {name!r}: {first[name]} and {url}; "
                            "each part's activations are saved under its file name, so one "
                            "would overwrite the other. Give the tars distinct names (e.g. "
                            "cc3m-00000.tar, sbu-00000.tar) or extract each folder separately")
        first[name] = url


def ends_whole(path: Path) -> bool:
    """A tar written to the end closes with two zero blocks; one cut short (an interrupted
    download or copy) does not, and tarfile's stream mode reads it without complaint."""
    size = path.stat().st_size
    if size < 1024 or size % 512:
        return False
    with path.open("rb") as file:
        file.seek(size - 1024)
        return not any(file.read(1024))


def expand_urls(urls: str | Sequence[str], allow_remote: bool = False) -> list[str]:
    """Folder -> its sorted ``*.tar``; brace patterns and globs expanded; order kept. Every
    local file must exist, so a wrong path fails here rather than as an empty extraction."""
    out: list[str] = []
    for spec in [urls] if isinstance(urls, (str, Path)) else urls:
        found, missing = [], []
        for item in braceexpand.braceexpand(str(spec)):
            if is_remote(item):
                refuse_remote(item, allow_remote)
                found.append(item)
            elif Path(item).is_dir():
                found += sorted(str(p) for p in Path(item).glob("*.tar"))
            elif any(c in item for c in "*?["):
                found += sorted(glob.glob(item))
            elif Path(item).is_file():
                found.append(item)
            else:
                missing.append(item)
        if missing or not found:
            detail = (f"{len(missing)} file(s) it names do not exist, e.g. {missing[0]}"
                      if missing else "no .tar file matches it")
            raise FileNotFoundError(f"data {str(spec)!r}: {detail}; check the path or pattern")
        out += found
    return out
