"""Synthetic activation shards: paired vision / text activations for training, and images'
vision rows with captions (or pooled codes / scores) for fitting readouts."""

from __future__ import annotations

from pathlib import Path

import torch

from sae_training.extract import write_manifest
from sae_training.store import write_shard

WORDS = ["red", "green", "blue", "yellow", "purple", "orange"]
"""The words ``write_pairs``' captions name."""
D, N = 32, 800
"""``write_pairs``' default width and its number of images."""


def write_activations(folder: Path, n: int = 512, d: int = 32, site: str = "layer_input",
                      n_concepts: int = 24, seed: int = 0, per_shard: int = 200) -> None:
    """Pairs that share 3 of ``n_concepts`` ground-truth concepts; each modality sees them
    through its own random map plus an offset (a modality gap), as real VLM activations do."""
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(n, n_concepts, generator=g).argsort(dim=1)[:, :3]
    z = torch.zeros(n, n_concepts).scatter_(1, active, 1 + torch.rand(n, 3, generator=g))
    maps = torch.randn(2, n_concepts, d, generator=g)
    offset = 3 * torch.randn(2, d, generator=g)
    vision = z @ maps[0] + offset[0] + 0.05 * torch.randn(n, d, generator=g)
    text = z @ maps[1] + offset[1] + 0.05 * torch.randn(n, d, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    info = {"model": "synthetic", "model_type": "llava" if site != "clip_embeds" else "clip",
            "site": site, "layer": 3 if site.startswith("layer") else None, "d_model": d,
            "prompt": None}
    for i, start in enumerate(range(0, n, per_shard)):
        rows = slice(start, min(n, start + per_shard))
        keys = [f"{j:06d}" for j in range(rows.start, rows.stop)]
        write_shard(folder / f"{i:05d}.safetensors", vision[rows], text[rows], keys,
                    [f"caption {j}" for j in range(rows.start, rows.stop)], info)
    write_manifest(folder)


def write_shard_of(folder: Path, vision: torch.Tensor, captions: list[str], codes_of: str | None,
                   pool: str | None = None) -> None:
    folder.mkdir(parents=True)
    write_shard(folder / "00000.safetensors", vision, vision.clone(),
                [str(i) for i in range(len(vision))], captions,
                {"model": "toy", "model_type": "llava", "site": "layer_input", "layer": 0,
                 "d_model": vision.shape[1], "prompt": None, "codes_of": codes_of, "pool": pool})
    write_manifest(folder)


def write_pairs(folder: Path, shuffle: bool, codes_of: str | None = None, width: int = D) -> None:
    """Each image shows 1-3 of WORDS: its vision row is the sum of their directions + noise
    (with ``codes_of``: pooled codes, nonnegative, ``width`` wide, of a space of that name)."""
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(len(WORDS), width, generator=g)
    shown = torch.rand(N, len(WORDS), generator=g) < 0.3
    shown[shown.sum(1) == 0, 0] = True
    vision = shown.float() @ directions + 0.3 * torch.randn(N, width, generator=g)
    if codes_of:
        vision = vision.relu()
    captions = ["there is " + " and ".join(w for w, s in zip(WORDS, row) if s)
                for row in shown.tolist()]
    if shuffle:
        captions = [captions[i] for i in torch.randperm(N, generator=g).tolist()]
    write_shard_of(folder, vision, captions, codes_of)
