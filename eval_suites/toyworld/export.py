"""Write a seed's held-out scenes in the formats real data comes in, for other tools to read.

- ``shards/00000.tar``: img2dataset-style webdataset (``<key>.jpg``, ``<key>.txt``, ``<key>.json``),
  the way users keep CC3M;
- ``pope/{split}.parquet`` for each of ``pope.SPLITS`` (negated and binding too): lmms-eval
  POPE fields (question_id, question, answer, image_source, category, image) with the image
  embedded; ``pope/vcd_{split}.jsonl`` + ``images/``: the
  VCD / VL-SAE question-file format;
- ``chair/ground_truth.json`` (image id -> objects) and ``chair/synonyms.json`` (object -> phrases).

An export over an earlier one replaces it whole; it refuses a folder holding files under its
names that no export wrote (``EXPORT_MARK``).
"""

from __future__ import annotations

import io
import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..reproduce.journal import atomic_write
from .language import caption
from .pope import SPLITS, pope_questions
from .world import (
    CLASS_NAMES,
    CLASSES,
    STREAM_PAIRS,
    RenderedScene,
    WorldConfig,
    class_synonyms,
    heldout_scenes,
    make_scene,
)


def image_id(seed: int, index: int) -> str:
    return f"toyworld_{seed}_{index:05d}"


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder: Path, keys: list[str], scenes: list[RenderedScene],
                 rng: np.random.Generator, shard_size: int = 1000) -> list[str]:
    """img2dataset-style webdataset shards (``00000.tar``...) of image-caption pairs, into a
    folder that holds none yet (extraction reads every .tar of a folder, so an earlier export's
    left there would join this one's); returns their names."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in folder.glob("*.tar"))
    if stale:
        raise FileExistsError(f"{folder} already holds {len(stale)} .tar shard(s) ({stale[0]}, "
                              "...), which extraction would read with this export's: delete "
                              "them or export into another folder")
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=shard_size, verbose=0) as sink:
        for key, s in tqdm(zip(keys, scenes), total=len(keys), desc="shards", dynamic_ncols=True):
            text = caption(s.scene, rng)
            jpg = io.BytesIO()
            s.image.save(jpg, format="JPEG", quality=95)
            meta = {"key": key, "caption": text, "objects": list(s.scene.names),
                    "broken_pair": s.scene.broken_pair}
            sink.write({"__key__": key, "jpg": jpg.getvalue(), "txt": text,
                        "json": json.dumps(meta)})
    return sorted(p.name for p in folder.glob("*.tar"))


def export_training_pairs(out: Path, seed: int, n_pairs: int, shard_size: int = 1000,
                          world: WorldConfig = WorldConfig()) -> list[str]:
    """Image-caption pairs as shards (what a concept space is trained on, the way users hold
    CC3M), drawn from a stream no evaluation set uses; ``world`` chooses their distribution
    (default: the training distribution)."""
    scenes = (make_scene(seed, STREAM_PAIRS, i, world) for i in range(n_pairs))
    keys = [f"pairs_{seed}_{i:07d}" for i in range(n_pairs)]
    return write_shards(out, keys, list(scenes), np.random.default_rng([seed, 98]), shard_size)


SHARD_FILE = re.compile(r"\d{5}\.tar")
"""The names of the shards ``write_shards`` writes."""

PAIRS_RECORD = "pairs.json"
"""Beside the shards of ``training_pairs``: how they were drawn, written after the last one."""


def training_pairs(out: Path, seed: int, n_pairs: int, world: WorldConfig = WorldConfig(),
                   record: dict | None = None) -> Path:
    """``out`` holding ``export_training_pairs(out, seed, n_pairs, world)``: reused when its
    record (``PAIRS_RECORD``, plus ``record``) says they were drawn so; exported again when
    they were drawn otherwise, cut short by a kill, or are of unknown origin (no record), so
    nothing is ever fitted on pairs other than those its caller names."""
    drawn = out / PAIRS_RECORD
    info = json.loads(json.dumps({"seed": seed, "n_pairs": n_pairs, "world": asdict(world),
                                  **(record or {})}))  # as it reads back
    if drawn.is_file() and json.loads(drawn.read_text()) == info:
        return out
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if not SHARD_FILE.fullmatch(p.name))
        if foreign and not drawn.is_file():  # no record: not a folder this function made
            raise FileExistsError(f"{out} holds {len(foreign)} file(s) that drawing pairs did not "
                                  f"write ({_first_names(foreign)}) and that drawing them again "
                                  "would delete: move them or use another --work folder")
        shutil.rmtree(out)
    export_training_pairs(out, seed, n_pairs, world=world)
    atomic_write(drawn, json.dumps(info, indent=2) + "\n")
    return out


def _first_names(names: list[str]) -> str:
    """The first three of ``names``, for a message, with ", ..." when there are more."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


EXPORT_KEYS = ("seed", "n_images", "shards", "pope", "chair")
"""What an export's manifest.json holds: a manifest without them is another artifact's."""


def check_export_folder(out: Path) -> None:
    """Refuse a folder whose manifest.json is not an export's (an extraction's, a run's): an
    export replaces its files, and would take that artifact's manifest with them."""
    manifest = out / "manifest.json"
    if not manifest.exists():
        return
    try:
        keys = set(json.loads(manifest.read_text()))
    except (ValueError, TypeError):
        keys = set()
    if not keys >= set(EXPORT_KEYS):
        raise ValueError(f"{out} holds a manifest.json that is not a toy-world export's (keys "
                         f"{sorted(keys)}); export into another folder")


EXPORT_MARK = ".toyworld-export"
"""Written into a folder before an export changes anything there (its manifest.json comes
last): files in a folder with neither were not written by an export, and none is replaced."""


def export_files(out: Path) -> list[Path]:
    """The files in ``out`` that an export replaces: every shard and image (the CHAIR protocol
    lists the images folder, extraction reads every shard) and its POPE and CHAIR files."""
    named = [*(f"pope/{split}.parquet" for split in SPLITS),
             *(f"pope/vcd_{split}.jsonl" for split in SPLITS),
             *(f"chair/{name}.json" for name in ("ground_truth", "synonyms", "broken_pair"))]
    return [*sorted((out / "shards").glob("*.tar")), *sorted((out / "images").glob("*.png")),
            *(path for name in named if (path := out / name).exists())]


def export_heldout(out: Path, seed: int, n_images: int, shard_size: int = 1000) -> dict:
    """Write the three formats under ``out``; returns the manifest (also saved as manifest.json)."""
    from datasets import Dataset, Features, Image, Value

    out.mkdir(parents=True, exist_ok=True)
    check_export_folder(out)
    replaced = export_files(out)
    if replaced and not ((out / "manifest.json").exists() or (out / EXPORT_MARK).exists()):
        names = [p.relative_to(out).as_posix() for p in replaced]
        raise FileExistsError(f"{out} holds {len(names)} file(s) an export would replace "
                              f"({_first_names(names)}) but no export's {EXPORT_MARK} or "
                              "manifest.json: move them or export into another folder")
    (out / EXPORT_MARK).touch()
    (out / "manifest.json").unlink(missing_ok=True)  # written last: only a whole export has one
    for path in replaced:  # an earlier export's, whole or cut short
        path.unlink()
    scenes = heldout_scenes(seed, n_images)
    ids = [image_id(seed, i) for i in range(n_images)]
    rng = np.random.default_rng([seed, 99])

    shards = write_shards(out / "shards", ids, scenes, rng, shard_size)
    (out / "images").mkdir(exist_ok=True)
    for key, s in zip(ids, scenes):
        s.image.save(out / "images" / f"{key}.png")

    (out / "pope").mkdir(exist_ok=True)
    features = Features({
        "question_id": Value("int64"), "question": Value("string"), "answer": Value("string"),
        "image_source": Value("string"), "category": Value("string"), "image": Image(),
    })
    for split in SPLITS:
        rows = pope_questions([s.scene.classes for s in scenes], split, seed)
        records = [{
            "question_id": r["question_id"], "question": r["question"], "answer": r["answer"],
            "image_source": ids[r["image_index"]], "category": split,
            "image": {"bytes": _png(scenes[r["image_index"]].image), "path": None},
        } for r in rows]
        Dataset.from_list(records, features=features).to_parquet(
            str(out / "pope" / f"{split}.parquet"))
        with open(out / "pope" / f"vcd_{split}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps({"question_id": r["question_id"],
                                    "image": f"{ids[r['image_index']]}.png",
                                    "text": r["question"], "label": r["answer"]}) + "\n")

    (out / "chair").mkdir(exist_ok=True)
    truth = {key: list(s.scene.names) for key, s in zip(ids, scenes)}
    (out / "chair" / "ground_truth.json").write_text(json.dumps(truth, indent=1))
    synonyms = {CLASS_NAMES[c]: list(class_synonyms(c)) for c in range(len(CLASSES))}
    (out / "chair" / "synonyms.json").write_text(json.dumps(synonyms, indent=1))
    broken = [key for key, s in zip(ids, scenes) if s.scene.broken_pair]
    (out / "chair" / "broken_pair.json").write_text(json.dumps(broken))

    manifest = {"seed": seed, "n_images": n_images, "shards": shards,
                "pope": {split: f"pope/{split}.parquet" for split in SPLITS},
                "chair": {"ground_truth": "chair/ground_truth.json",
                          "synonyms": "chair/synonyms.json",
                          "broken_pair": "chair/broken_pair.json"}}
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=2))
    return manifest
