"""Activation shards on disk: safetensors files of ``vision`` [n, d] and ``text`` [n, d] rows.

Keys and captions of the rows ride in the safetensors metadata, with the model / site / layer
they came from, so a shard is self-describing. Writes are atomic (tmp file + ``os.replace``):
a file that exists is complete, which is what makes extraction resumable. Reading memory-maps
the tensors, so training gathers random rows from datasets far larger than RAM.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vlsae_hooks.tensor_files import as_umask_allows, save_tensors_atomically

MANIFEST = "manifest.json"
SHARD_SUFFIX = ".safetensors"
_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file in its folder + ``os.replace``: a reader (or a
    resumed run) never sees half a file, even if the process is killed mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        as_umask_allows(tmp)  # mkstemp makes owner-only files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_png(fig, path: Path, dpi: int) -> Path:
    """Save a matplotlib figure as ``path`` (PNG) with ``atomic_write_bytes``: a run killed
    while drawing leaves the earlier picture, never half of one."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def clear_numbered_pngs(folder: Path) -> None:
    """Delete the ``NNNN.png`` pictures an earlier drawing left in ``folder``, before a new one
    draws its own: a folder of numbered pictures holds one run's, never the tail of a larger
    earlier run's beside them."""
    for stale in Path(folder).glob("[0-9][0-9][0-9][0-9].png"):
        stale.unlink()


def write_json(path: Path, data: dict) -> None:
    """``data`` as strict JSON, atomically: a number that is not finite (an explained variance
    of rows without spread) is written null, as JSON has no NaN (Python writes one that jq and
    JavaScript refuse)."""
    text = json.dumps(finite_or_null(data), indent=2, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def finite_or_null(value):
    """``value`` with every float that is not finite, however deep in dicts and lists, None."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def write_shard(path: Path, vision: Tensor, text: Tensor, keys: list[str], captions: list[str],
                info: dict) -> None:
    """Atomically write one shard; ``info`` (model, site, layer, ...) goes in its metadata."""
    if not (vision.shape == text.shape and vision.shape[0] == len(keys) == len(captions)):
        raise ValueError(f"shard rows disagree: vision {tuple(vision.shape)}, text "
                         f"{tuple(text.shape)}, {len(keys)} keys, {len(captions)} captions")
    metadata = {"keys": json.dumps(keys), "captions": json.dumps(captions),
                "info": json.dumps(info)}
    save_tensors_atomically({"vision": vision.contiguous().cpu(),
                             "text": text.contiguous().cpu()}, path, metadata=metadata)


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header and the byte offset where tensor data starts."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def shard_metadata(path: Path) -> dict:
    """Keys, captions and info of a shard, without touching its tensors."""
    meta = read_header(path)[0].get("__metadata__", {})
    return {name: json.loads(meta[name]) for name in ("keys", "captions", "info")}


def whole_shard_info(path: Path) -> dict | None:
    """A shard's info, or None when the file is cut short or garbled (its header unreadable,
    or the file shorter than the tensors its header lists): such a shard is not finished."""
    try:
        header, start = read_header(path)
        end = max((entry["data_offsets"][1] for name, entry in header.items()
                   if name != "__metadata__"), default=0)
        if path.stat().st_size < start + end:
            return None
        return json.loads(header["__metadata__"]["info"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def shard_rows(path: Path) -> int:
    return read_header(path)[0]["vision"]["shape"][0]


def _memmap(path: Path, header: dict, start: int, name: str) -> np.ndarray | None:
    entry = header[name]
    if entry["dtype"] not in _NUMPY:
        raise ValueError(f"{path}: {name} has unsupported dtype {entry['dtype']}")
    begin, end = entry["data_offsets"]
    if begin == end:
        return None
    return np.memmap(path, dtype=_NUMPY[entry["dtype"]], mode="r", offset=start + begin,
                     shape=tuple(entry["shape"]))


def _open_shard(path: Path) -> tuple[dict, int, np.ndarray | None, np.ndarray | None]:
    """A shard's header, data offset and memory-mapped (vision, text) rows; a missing, cut or
    garbled shard is named with what to do (numpy alone says only "mmap length is greater than
    file size")."""
    try:
        header, start = read_header(path)
        return header, start, _memmap(path, header, start, "vision"), _memmap(path, header,
                                                                               start, "text")
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"activation shard {path} cannot be read ({type(error).__name__}: "
                         f"{error}): it is missing, cut short or damaged; run `vlsae extract` "
                         "again with the same --out, which redoes that part") from None


MANIFEST_KEYS = ("d_model", "shards")
"""What every extraction's manifest.json holds (``write_manifest``); a manifest without them is
another artifact's (a toy-world export's)."""


def is_extraction_manifest(manifest: object) -> bool:
    """Whether a parsed manifest.json is an extraction's."""
    return isinstance(manifest, dict) and all(key in manifest for key in MANIFEST_KEYS)


def _read_manifest(path: Path) -> dict:
    """An extraction's ``manifest.json``; a torn file or another artifact's manifest (a toy-world
    export's) is refused with what it is not, instead of a JSON or key error."""
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): it is damaged; run `vlsae "
                         "extract` again with the same --out to rewrite it") from None
    if not is_extraction_manifest(manifest):
        raise ValueError(f"{path.parent} is not an extraction folder (no d_model in its "
                         "manifest): run `vlsae extract` first")
    return manifest


def _float32(rows: np.ndarray, bfloat16: bool) -> np.ndarray:
    """Stored rows as float32; bfloat16 bits (uint16) are the high half of a float32's."""
    if bfloat16:
        return (rows.astype(np.uint32) << 16).view(np.float32)
    return rows.astype(np.float32, copy=False)


class ActivationStore:
    """All shards of an extraction folder as one indexable table of (vision, text) rows."""

    def __init__(self, folder: str | Path, max_samples: int | None = None) -> None:
        self.folder = Path(folder)
        manifest_file = self.folder / MANIFEST
        if not manifest_file.is_file():
            raise FileNotFoundError(f"{self.folder} has no {MANIFEST}; run "
                                    "`python -m sae_training extract` first (or let it finish)")
        self.manifest = _read_manifest(manifest_file)
        self.d = int(self.manifest["d_model"])
        self.arrays: list[tuple[np.ndarray, np.ndarray]] = []
        """Each shard's (vision, text) rows as stored: float32, float16 or bfloat16 bits."""
        self.bfloat16: list[bool] = []
        """Whether each shard holds bfloat16 bits (read as uint16): a folder may mix shards of
        runs with different ``--save-dtype``, each read back as what it holds."""
        self.files: list[Path] = []
        for entry in self.manifest["shards"]:
            path = self.folder / entry["file"]
            header, start, vision, text = _open_shard(path)
            if vision is None:
                continue
            if vision.shape[1] != self.d:
                raise ValueError(f"{path}: width {vision.shape[1]}, manifest says {self.d}")
            if header["vision"]["dtype"] != header["text"]["dtype"]:
                raise ValueError(f"{path}: vision is {header['vision']['dtype']} and text "
                                 f"{header['text']['dtype']}; a shard stores both in one dtype "
                                 "(extract it again)")
            self.bfloat16.append(header["vision"]["dtype"] == "BF16")
            self.arrays.append((vision, text))
            self.files.append(path)
        sizes = [v.shape[0] for v, _ in self.arrays]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.length = int(self.offsets[-1]) if max_samples is None else min(
            int(self.offsets[-1]), max_samples)
        if self.length == 0:
            raise ValueError(f"{self.folder} holds no activations")

    def __len__(self) -> int:
        return self.length

    def _locate(self, indices: Tensor) -> tuple[np.ndarray, np.ndarray]:
        rows = indices.cpu().numpy().astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.length):
            raise IndexError(f"row index out of range [0, {self.length})")
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        return shard, rows - self.offsets[shard]

    def get(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """float32 (vision, text) rows at ``indices``, in that order."""
        shard, local = self._locate(indices)
        out = [np.empty((len(local), self.d), dtype=np.float32) for _ in range(2)]
        for s in np.unique(shard):
            mask = shard == s
            for arr, dst in zip(self.arrays[s], out):
                dst[mask] = _float32(arr[local[mask]], self.bfloat16[s])
        return tuple(torch.from_numpy(a) for a in out)

    def captions(self, indices: Tensor) -> list[tuple[str, str]]:
        """(key, caption) of rows; reads shard metadata lazily."""
        shard, local = self._locate(indices)
        cache: dict[int, dict] = {}
        out = []
        for s, i in zip(shard.tolist(), local.tolist()):
            if s not in cache:
                cache[s] = shard_metadata(self.files[s])
            out.append((cache[s]["keys"][i], cache[s]["captions"][i]))
        return out
