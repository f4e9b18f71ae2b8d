"""What an extraction's output folder must hold before a run writes into it: no other artifact's
manifest, no activations of another model, site or layer, and no shards of other data (a kept
shard's recorded origin, its files' paths, sizes and times or content, must be the part this run
reads); and which shards are finished, so a restarted run skips them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sae_training.file_stamps import file_sha256
from sae_training.samples import Source
from sae_training.store import MANIFEST, SHARD_SUFFIX, is_extraction_manifest, whole_shard_info

log = logging.getLogger(__name__)

IDENTITY = ("model", "model_type", "site", "layer", "d_model", "prompt", "codes_of", "pool")
"""Shard info that must agree for shards to share a folder."""


def shard_finished(path: Path) -> bool:
    """Shards are written atomically, so one that exists is whole, unless ``max_samples`` cut
    its part short or its data was damaged (then a later run redoes it); a shard cut short or
    garbled since (a copy broken off, a bad disk) is redone too."""
    if not path.exists():
        return False
    info = whole_shard_info(path)
    if info is None:
        log.warning("%s is cut short or damaged: extracting its part again", path)
        return False
    return not info.get("truncated", False) and not info.get("damaged")


def check_same_extractor(out: Path, info: dict) -> None:
    """Refuse to mix shards of different models / sites / layers in one folder."""
    wanted = {k: info[k] for k in IDENTITY}
    for path in sorted(out.glob(f"*{SHARD_SUFFIX}")):
        info = whole_shard_info(path)
        if info is None:  # cut short or damaged: redone, whatever it held
            continue
        have = {k: info.get(k) for k in IDENTITY}
        if have != wanted:
            raise ValueError(f"{out} already holds activations of {have}; this run would "
                             f"write {wanted}. Use another output folder.")
        break


def check_not_other_artifact(out: Path) -> None:
    """Refuse an ``out`` whose ``manifest.json`` is another artifact's (a toy-world export's):
    writing the extraction's manifest would destroy it. A torn one (not JSON) is rewritten."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError, json.JSONDecodeError):
        return
    if not is_extraction_manifest(manifest):
        keys = sorted(manifest) if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{out / MANIFEST} is not an extraction's manifest (no d_model in it; "
                         f"it holds {keys}): extracting into {out} would overwrite it. Pick "
                         "another --out")


def _describe(origin: dict) -> str:
    """A part's origin in words: each file's path, size and modification time."""
    files = ", ".join(f["file"] + (f" ({f['size']} bytes, modified {f['modified']})"
                                   if "size" in f else "") for f in origin["files"])
    return files + (f" in parts of {origin['rows_per_part']} rows"
                    if "rows_per_part" in origin else "")


def hashed_origin(origin: dict) -> dict:
    """``origin`` with each local file's content hash, as a shard records it."""
    return {**origin, "files": [{**f, "sha256": file_sha256(f["file"], f["size"], f["modified"])}
                                if "size" in f else f for f in origin["files"]]}


def _same_file(recorded: dict, current: dict) -> bool:
    """Same path and size, and the same modification time or else the same content (a file
    regenerated as it was, e.g. by a deterministic export run again)."""
    if (recorded["file"], recorded.get("size")) != (current["file"], current.get("size")):
        return False
    return recorded.get("modified") == current.get("modified") or recorded.get(
        "sha256") == file_sha256(current["file"], current["size"], current["modified"])


def _same_origin(recorded: dict, current: dict) -> bool:
    """Whether a shard's recorded origin is the part this run would read."""
    rest = {k: v for k, v in recorded.items() if k != "files"}
    return (rest == {k: v for k, v in current.items() if k != "files"}
            and len(recorded["files"]) == len(current["files"])
            and all(map(_same_file, recorded["files"], current["files"])))


def check_same_data(out: Path, source: Source) -> None:
    """Refuse to resume onto shards of other data: a kept shard's part must still be in the
    data and unchanged (same files and sizes, and modification times or content); a damaged one
    is redone anyway. Otherwise old activations would pass for the new data's."""
    origins = {part.name: source.origin(part) for part in source.parts()}
    for path in sorted(out.glob(f"*{SHARD_SUFFIX}")):
        info = whole_shard_info(path)
        if info is None:  # cut short or damaged: redone, whatever it held
            continue
        recorded, current = info.get("origin"), origins.get(path.name.removesuffix(SHARD_SUFFIX))
        if current is None:
            was = f" (of {_describe(recorded)})" if recorded else ""
            raise ValueError(f"{out} holds activations of other data: {path.name}{was} is of a "
                             "data part this data does not have. Use a new --out folder, or "
                             f"delete {out} to extract this data into it")
        if info.get("damaged"):
            continue
        if recorded is None:
            log.warning("%s records no data origin (an extraction before origins were "
                        "recorded): kept as this data's %s", path.name, _describe(current))
        elif not _same_origin(recorded, current):
            raise ValueError(f"{out} holds activations of other data: {path.name} was extracted "
                             f"from {_describe(recorded)}, this run reads {_describe(current)}. "
                             f"Use a new --out folder, or delete {out} to extract this data "
                             "into it")
