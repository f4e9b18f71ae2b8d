"""img2dataset-style image-caption tar shards: clean, corrupt or cut, for the readers and the
extraction tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def caption_of(i: int) -> str:
    return f"w{i % 7} w{(3 * i) % 11} w{i % 5}"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar of exactly these members, in this order (repeats included)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            _add(tar, name, data)


def write_shard(path: Path, start: int, n: int, corrupt: tuple[int, ...] = ()) -> list[str]:
    """An img2dataset-style tar; samples in ``corrupt`` get bytes that are not an image."""
    keys = []
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            key = f"{i:09d}"
            image = b"not a jpeg at all" if i in corrupt else jpeg_bytes(i)
            _add(tar, f"{key}.jpg", image)
            _add(tar, f"{key}.txt", caption_of(i).encode())
            _add(tar, f"{key}.json", json.dumps({"key": key, "caption": caption_of(i)}).encode())
            keys.append(key)
    return keys


def write_shards(folder: Path, n_shards: int = 3, per_shard: int = 8) -> list[str]:
    """Clean shards ``00000.tar``..; returns all keys in order."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(n_shards):
        keys += write_shard(folder / f"{s:05d}.tar", s * per_shard, per_shard)
    return keys
