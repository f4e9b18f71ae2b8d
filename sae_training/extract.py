"""Write extracted (vision, text) pairs as activation shards, part by part, and describe them in
``manifest.json``; ``run_extract`` is the ``extract`` command. What a row holds is the
extractor's (``extractors``: one per model kind, reading an unmodified HF model through hooks).

One safetensors shard per data part, written atomically: a restarted run skips finished parts,
and ``accelerate launch`` processes each take every N-th part. A damaged data part (a cut, corrupt
or empty tar) is never finished: extraction stops with an error naming it, or with ``skip_bad``
keeps what it could read in a shard marked damaged, which the next run retries. Every skipped
sample is listed in ``skipped.jsonl`` next to the manifest.
What a folder must hold before a run writes or resumes there is ``extract_folder``'s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sae_training.config import ExtractConfig
from sae_training.extract_folder import (
    IDENTITY,
    check_not_other_artifact,
    check_same_data,
    check_same_extractor,
    hashed_origin,
    shard_finished,
)
from sae_training.extractors import Extractor, load_model, make_extractor
from sae_training.readers import open_source
from sae_training.samples import DataError, Sample, Source
from sae_training.store import (
    MANIFEST,
    SHARD_SUFFIX,
    atomic_write_bytes,
    read_header,
    shard_metadata,
    shard_rows,
    write_json,
    write_shard,
)

log = logging.getLogger(__name__)

SKIP_REPORT = "skipped.jsonl"
"""One line per skipped sample or damaged data part, rewritten with the manifest."""


def _batches(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    iterator = iter(samples)
    while batch := list(islice(iterator, size)):
        yield batch


def extract(extractor: Extractor, source: Source, out: str | Path, model_name: str, *,
            batch_size: int = 16, save_dtype: str = "auto", max_samples: int | None = None,
            process_index: int = 0, num_processes: int = 1, skip_bad: bool = False,
            check_data: bool = True) -> list[Path]:
    """Write this process's parts of ``source`` as shards in ``out``; returns the new shards.

    Process ``i`` of ``n`` takes parts i, i + n, ...; parts whose shard exists are skipped.
    Damaged parts raise ``DataError`` (after the others are done) unless ``skip_bad``.
    ``check_data=False`` when the caller has just checked that the kept shards are of this data
    (``run_extract``, before the model loads), so its warnings are not printed twice.
    """
    out = Path(out)
    check_not_other_artifact(out)
    out.mkdir(parents=True, exist_ok=True)
    info = extractor.info(model_name)
    check_same_extractor(out, info)
    if check_data:
        check_same_data(out, source)
    parts = source.parts()[process_index::num_processes]
    todo = [p for p in parts if not shard_finished(out / f"{p.name}{SHARD_SUFFIX}")]
    log.info("%s site=%s layer=%s: %d parts for process %d/%d, %d already done", model_name,
             extractor.site, extractor.layer, len(parts), process_index, num_processes,
             len(parts) - len(todo))
    sizes = [p.size for p in todo]
    total = sum(sizes) if None not in sizes else None
    budget = max_samples
    if budget is not None:  # the pairs this process's finished parts already hold count
        done = {p.name for p in parts} - {p.name for p in todo}
        budget = max(0, budget - sum(shard_rows(out / f"{name}{SHARD_SUFFIX}") for name in done))
        total = min(total, budget) if total is not None else budget
    written: list[Path] = []
    damaged: list[str] = []
    with tqdm(total=total, desc=f"extract[{process_index}]", unit="pair",
              disable=process_index != 0) as bar:
        for part in todo:
            if budget == 0:
                break
            skipped_before = len(source.skipped.records)
            vision, text, keys, captions = [], [], [], []
            rows = iter(part)
            for batch in _batches(islice(rows, budget), batch_size):
                v, t = extractor(batch)
                dtype = v.dtype if save_dtype == "auto" else getattr(torch, save_dtype)
                vision.append(v.to("cpu", dtype))
                text.append(t.to("cpu", dtype))
                keys += [s.key for s in batch]
                captions += [s.caption for s in batch]
                bar.update(len(batch))
            truncated = budget == len(keys) and next(rows, None) is not None
            skips = source.skipped.records[skipped_before:]
            damage = source.damaged.get(part.name)
            if budget is not None:
                budget -= len(keys)
            if damage:
                damaged.append(f"{part.file or part.name}: {damage}; {len(keys)} pairs "
                               f"readable, {len(skips)} skipped")
                if not skip_bad:
                    continue
            empty = torch.zeros(0, extractor.d_model)
            path = out / f"{part.name}{SHARD_SUFFIX}"
            write_shard(path, torch.cat(vision) if vision else empty,
                        torch.cat(text) if text else empty, keys, captions,
                        {**info, "skipped": len(skips), "skips": skips, "truncated": truncated,
                         "damaged": damage, "origin": hashed_origin(source.origin(part))})
            written.append(path)
            log.info("wrote %s (%d pairs, %d skipped)%s", path.name, len(keys), len(skips),
                     f", DAMAGED: {damage}" if damage else "")
    if source.skipped.total:
        log.warning("skipped %d bad samples: %s (listed in %s)", source.skipped.total,
                    dict(source.skipped.counts), out / SKIP_REPORT)
    if damaged and not skip_bad:
        raise DataError(f"{len(damaged)} data part(s) are damaged and were not extracted:\n  "
                        + "\n  ".join(damaged) + "\nRepair or re-download them and run again "
                        "(finished shards are kept; only these are redone), or pass --skip-bad "
                        f"to keep what can be read and list the rest in {SKIP_REPORT}.")
    if damaged:
        log.warning("--skip-bad: %d damaged data part(s) kept as far as readable and marked "
                    "unfinished (a later run retries them): %s", len(damaged), damaged)
    return written


def write_manifest(out: str | Path, source: Source | None = None,
                   data: str | None = None) -> dict:
    """Describe every shard in ``out`` (in part order) in ``manifest.json``; ``data`` records
    where the image-caption pairs came from (``inspect`` reads images back from it)."""
    out = Path(out)
    files = sorted(out.glob(f"*{SHARD_SUFFIX}"))
    shards, info, skipped, truncated, damaged, report = [], {}, 0, False, [], []
    for path in files:
        meta = shard_metadata(path)
        info = info or meta["info"]
        skipped += meta["info"].get("skipped", 0)
        truncated |= meta["info"].get("truncated", False)
        if meta["info"].get("damaged"):
            damaged.append(path.name)
            report.append({"shard": path.name, "reason": "damaged data part",
                           "error": meta["info"]["damaged"]})
        report += [{"shard": path.name, **r} for r in meta["info"].get("skips", [])]
        shards.append({"file": path.name, "count": len(meta["keys"])})
    _write_report(out / SKIP_REPORT, report)
    count = sum(s["count"] for s in shards)
    if count == 0:
        raise DataError(f"no usable image-caption pairs in {data or out} ({skipped} samples "
                        f"skipped{f', see {out / SKIP_REPORT}' if report else ''}); nothing to "
                        "train on, so no manifest was written. Check --data.")
    dtypes = sorted({read_header(path)[0]["vision"]["dtype"]  # of rows: an empty shard has none
                     for path, shard in zip(files, shards) if shard["count"]})
    dtype = dtypes[0] if len(dtypes) == 1 else f"mixed ({', '.join(dtypes)})"  # each read as is
    manifest = {**{k: info.get(k) for k in IDENTITY}, "count": count, "dtype": dtype,
                "skipped": skipped, "damaged": damaged, "source": data, "shards": shards}
    if source is not None:
        expected = {f"{p.name}{SHARD_SUFFIX}" for p in source.parts()}
        manifest["complete"] = (expected <= {s["file"] for s in shards} and not truncated
                                and not damaged)
    write_json(out / MANIFEST, manifest)
    return manifest


def _write_report(path: Path, records: list[dict]) -> None:
    """Rewrite the skip report from the shards (a stale one would list repaired data)."""
    if records:
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())
    else:
        path.unlink(missing_ok=True)


def run_extract(config: ExtractConfig, *, skip_bad: bool = False,
                allow_remote: bool = False) -> dict:
    """CLI entry: open the data (before the model, so a wrong path fails fast), load model +
    processor, split the data over accelerate processes, extract. ``skip_bad``: keep going past
    damaged data parts; ``allow_remote``: read ``pipe:`` commands and URLs."""
    from sae_training.distributed import make_state
    from sae_training.logs import logging_while_checking

    state = make_state()
    out = Path(config.out)
    check_not_other_artifact(out)  # before the log file goes in
    with logging_while_checking(out, "extract", state.process_index):  # refused: no --out left
        reader_options = {k: v for k, v in (("caption_column", config.caption_column),
                                            ("image_column", config.image_column)) if v}
        source = open_source(config.data, allow_remote, **reader_options)
        if hasattr(source, "rows_per_part"):
            source.rows_per_part = config.rows_per_part
        check_same_data(out, source)  # other data's shards are refused before the model loads
        model, processor = load_model(config.model, config.dtype, config.load_in_4bit,
                                      state.device)
        extractor = make_extractor(model, processor, config.site, config.layer, config.prompt,
                                   config.codes_of, config.scores)
    extract(extractor, source, out, config.model, batch_size=config.batch_size,
            save_dtype=config.save_dtype, max_samples=config.max_samples,
            process_index=state.process_index, num_processes=state.num_processes,
            skip_bad=skip_bad, check_data=False)
    state.wait_for_everyone()
    manifest = write_manifest(out, source, config.data) if state.is_main_process else {}
    if manifest:
        log.info("manifest: %d pairs in %d shards (d=%d, %s)", manifest["count"],
                 len(manifest["shards"]), manifest["d_model"], manifest["dtype"])
    return manifest
