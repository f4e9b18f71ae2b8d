"""What a finished training run leaves in its folder: the trained modules as a ``VLSAESpace``
(``space/``, saved first so that it is kept if the metrics fail) and ``metrics.json``, its
held-out quality (``metrics``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sae_training.config import TrainConfig
from sae_training.data_split import DataSplit
from sae_training.dead_concepts import DeadConcepts
from sae_training.metrics import dead_fraction, evaluate
from sae_training.stages import steps_per_epoch
from sae_training.store import write_json
from vlsae_hooks.spaces import VLSAE, AuxAligner, SpaceConfig, VLSAESpace

log = logging.getLogger(__name__)


def build_space(sae: VLSAE, aligner: AuxAligner | None, config: TrainConfig,
                data: DataSplit) -> VLSAESpace:
    """CPU copies of the trained modules as a space whose config records where they belong."""
    m = data.store.manifest
    space_config = SpaceConfig(
        kind="vlsae", d_model=sae.d, n_concepts=sae.h, k=sae.k,
        model_name=m["model"], model_type=m["model_type"], site=m["site"],
        layer=m["layer"], has_aligner=aligner is not None, source="vlsae",
        extra={"training": config.to_dict(),
               "data": {"count": m["count"], "prompt": m.get("prompt"),
                        "n_train": len(data.train_rows), "n_val": len(data.val_rows)}})
    aligner_copy = None
    if aligner is not None:
        aligner_copy = AuxAligner(sae.d)
        aligner_copy.load_state_dict({k: v.cpu() for k, v in aligner.state_dict().items()})
    sae_copy = VLSAE(sae.d, sae.h, sae.k)
    sae_copy.load_state_dict({k: v.cpu() for k, v in sae.state_dict().items()})
    return VLSAESpace(sae_copy, aligner_copy, space_config)


def total_steps(config: TrainConfig, n_train: int, use_aligner: bool) -> dict[str, int]:
    """Optimizer steps per stage that ran."""
    out = {}
    for name, settings in (("aligner", config.aligner), ("sae", config.sae)):
        if name == "sae" or use_aligner:
            out[name] = steps_per_epoch(settings, n_train) * settings.epochs
    return out


def save_results(out: Path, sae: VLSAE, aligner: AuxAligner | None, config: TrainConfig,
                 data: DataSplit, dead: DeadConcepts, device: torch.device) -> dict:
    """Save the space to ``out/space``, then measure it on the held-out rows (and the dead
    fraction on those and up to 100k training rows) into ``out/metrics.json``."""
    build_space(sae, aligner, config, data).save_pretrained(out / "space")
    store, batch_size = data.store, config.sae.batch_size
    metrics = evaluate(sae, aligner, store, data.val_rows, batch_size, device)
    sample = torch.cat([data.val_rows, data.train_rows[:100_000]])
    metrics["dead_fraction"] = dead_fraction(sae, aligner, store, sample, batch_size, device)
    metrics["dead_fraction_tracker"] = float(dead.mask().float().mean())
    metrics.update(n_train=len(data.train_rows),
                   steps=total_steps(config, len(data.train_rows), aligner is not None))
    write_json(out / "metrics.json", metrics)
    log.info("explained variance vision %.4f text %.4f, dead %.4f, agreement matched "
             "%.3f vs shuffled %.3f; space saved to %s",
             metrics["explained_variance"]["vision"],
             metrics["explained_variance"]["text"], metrics["dead_fraction"],
             metrics["concept_agreement"]["matched"],
             metrics["concept_agreement"]["shuffled"], out / "space")
    return metrics
