"""Look at a trained space: a PNG sheet of each chosen concept's top images and top captions,
and a PNG of the training curves from ``train_log.jsonl``."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import torch

from sae_training.readers import open_source
from sae_training.samples import Source
from sae_training.store import ActivationStore, atomic_write_png
from vlsae_hooks.spaces.vlsae import VLSAESpace

log = logging.getLogger(__name__)


@torch.no_grad()
def top_rows(space: VLSAESpace, store: ActivationStore, rows: torch.Tensor, concepts: list[int],
             n_top: int, batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """For each modality, [len(concepts), n_top] row indices of the strongest activations
    (-1 where fewer rows activate the concept)."""
    best = {m: (torch.full((len(concepts), 0), -1.0), torch.full((len(concepts), 0), -1,
                                                                 dtype=torch.long))
            for m in ("vision", "text")}
    wanted = torch.tensor(concepts)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        for modality, x in zip(("vision", "text"), store.get(chunk)):
            dense = space.encode(x, modality)[:, wanted].T  # [c, b]
            scores = torch.cat([best[modality][0], dense], dim=1)
            ids = torch.cat([best[modality][1], chunk.expand(len(concepts), -1)], dim=1)
            top = scores.topk(min(n_top, scores.shape[1]), dim=1)
            best[modality] = (top.values, ids.gather(1, top.indices))
    return {m: torch.where(v > 0, i, -1) for m, (v, i) in best.items()}


def most_used(space: VLSAESpace, store: ActivationStore, rows: torch.Tensor, n: int) -> list[int]:
    """The ``n`` concepts that fire most often (both modalities) on ``rows``: all of them, most
    used first, when the space has no more than ``n``."""
    counts = torch.zeros(space.config.n_concepts)
    for start in range(0, len(rows), 1024):
        for modality, x in zip(("vision", "text"), store.get(rows[start:start + 1024])):
            counts += (space.encode(x, modality) > 0).sum(0).float()
    return counts.topk(min(n, len(counts))).indices.tolist()


def concept_sheet(space_dir: str | Path, data: str | Path, out: str | Path,
                  concepts: list[int] | None = None, n_concepts: int = 6, n_top: int = 5,
                  source: str | None = None, max_samples: int = 20_000,
                  allow_remote: bool = False) -> Path:
    """Write a PNG: one row per concept, its top images (read back from the image-caption
    ``source``, default: the one recorded by extraction) and its top captions. A ``pipe:`` or
    URL source (which a manifest could carry) is refused unless ``allow_remote``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    space = VLSAESpace.from_pretrained(space_dir)
    store = ActivationStore(data, max_samples)
    images_from = _open_images(source or store.manifest.get("source"), allow_remote)
    rows = torch.arange(len(store))
    concepts = concepts or most_used(space, store, rows, n_concepts)
    bad = [c for c in concepts if not 0 <= c < space.config.n_concepts]
    if bad:
        raise ValueError(f"concepts {bad} out of range [0, {space.config.n_concepts})")
    best = top_rows(space, store, rows, concepts, n_top)
    needed = {int(r) for r in best["vision"].flatten() if r >= 0}
    keys = {int(r): key for r, (key, _) in zip(sorted(needed), store.captions(
        torch.tensor(sorted(needed), dtype=torch.long)))} if needed else {}
    images = _load_images(images_from, set(keys.values()))
    fig, axes = plt.subplots(len(concepts), n_top + 1, squeeze=False,
                             figsize=(2.2 * (n_top + 1) + 3, 2.2 * len(concepts)),
                             gridspec_kw={"width_ratios": [1] * n_top + [2.5]})
    for i, concept in enumerate(concepts):
        for j in range(n_top):
            ax = axes[i][j]
            ax.axis("off")
            row = int(best["vision"][i, j]) if j < best["vision"].shape[1] else -1
            if row >= 0 and keys.get(row) in images:
                ax.imshow(images[keys[row]])
            if j == 0:
                never = not (best["vision"][i] >= 0).any() and not (best["text"][i] >= 0).any()
                ax.set_title(f"concept {concept}" + (" (never active)" if never else ""),
                             loc="left", fontsize=9)
        text_rows = [int(r) for r in best["text"][i] if r >= 0]
        captions = [c for _, c in store.captions(torch.tensor(text_rows, dtype=torch.long))] \
            if text_rows else []
        axes[i][n_top].axis("off")
        axes[i][n_top].text(0, 1, "\n".join(textwrap.shorten(c, 60) for c in captions),
                            va="top", fontsize=8, family="monospace")
    out = Path(out)
    fig.tight_layout()
    atomic_write_png(fig, out, dpi=80)
    plt.close(fig)
    log.info("concept sheet for %s -> %s", concepts, out)
    return out


def _open_images(spec: str | None, allow_remote: bool) -> Source | None:
    """The image source, opened before any work; images are optional, so data that has moved
    only costs them, but a refused ``pipe:`` / URL source is an error."""
    if not spec:
        return None
    try:
        return open_source(spec, allow_remote)
    except FileNotFoundError as error:
        log.warning("%s: the sheet shows captions only (pass --source)", error)
        return None


def _load_images(source: Source | None, keys: set[str]) -> dict:
    """Scan the image-caption source once for ``keys`` (stops when all are found); says how
    many it could not find."""
    if source is None or not keys:
        if keys:
            log.warning("no image source known (pass --source): the sheet shows captions only")
        return {}
    found = {}
    for sample in source:
        if sample.key in keys:
            found[sample.key] = sample.image
            if len(found) == len(keys):
                break
    if len(found) < len(keys):
        log.warning("%d of %d images were not found in the image source; their tiles stay "
                    "blank (pass --source: the data the activations were extracted from)",
                    len(keys) - len(found), len(keys))
    return found


CURVE_PANELS = ("loss", "infonce", "mse_vision", "mse_text", "mse_pair", "auxk",
                "dead_fraction")
"""Logged metrics plotted by ``training_curves``, in this order, where a stage logs them."""


def training_curves(run: str | Path, out: str | Path) -> Path:
    """Plot each stage's logged metrics against step, one column per stage and one panel per
    metric that stage logs (no empty panels), with the held-out loss over the training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = _log_records(Path(run) / "train_log.jsonl")
    stages = list(dict.fromkeys(r["stage"] for r in records))
    panels = {stage: [key for key in CURVE_PANELS
                      if any(key in r for r in records if r["stage"] == stage)]
              for stage in stages}
    n_rows = max(map(len, panels.values()))
    fig, axes = plt.subplots(n_rows, len(stages), squeeze=False,
                             figsize=(5 * len(stages), 2.4 * n_rows))
    for col, stage in enumerate(stages):
        rs = [r for r in records if r["stage"] == stage]
        for row in range(n_rows):
            ax = axes[row][col]
            if row >= len(panels[stage]):
                ax.set_visible(False)
                continue
            key = panels[stage][row]
            for name, label in ((key, "train"), *((("val_loss", "held out"),)
                                                   if key == "loss" else ())):
                points = [(r["step"], r[name]) for r in rs if name in r]
                if points:
                    ax.plot(*zip(*points), label=label)
            if key == "loss":
                ax.legend(fontsize=8)
            ax.set_title(f"{stage}: {key}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
    out = Path(out)
    fig.tight_layout()
    atomic_write_png(fig, out, dpi=80)
    plt.close(fig)
    return out


def _log_records(path: Path) -> list[dict]:
    """The records of a run's JSON-lines log, blank lines skipped; a last line torn by a kill
    (or still being written) is left out with a warning, any other line that is not JSON, or a
    log without records, is refused naming the file."""
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1)
             if line.strip()]
    records = []
    for position, (number, line) in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if position < len(lines):
                raise ValueError(f"{path} line {number} is not JSON: fix or delete that "
                                 "line") from None
            log.warning("leaving out the torn last line of %s: %r", path, line)
    if not records:
        raise ValueError(f"{path} holds no log records: the run has not logged a step yet "
                         "(train writes one every --log-every steps)")
    return records
