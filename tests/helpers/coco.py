"""COCO-format boxes painted into small PNGs, a space for the tiny LLaVA, and the
``patch-readout`` command run on them quickly on the CPU (``test_grounding_readout*.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sae_training.cli import main
from vlsae_hooks import VLSAE, SpaceConfig, VLSAESpace

CATEGORIES = [{"id": 1, "name": "w10"}, {"id": 2, "name": "w11"},
              {"id": 3, "name": "w12 w13"},  # two tokens: no spelling, left out
              {"id": 7, "name": "w14"}]  # no box: left out
COLOURS = {1: (230, 30, 30), 2: (30, 30, 230)}
QUICK = ["--steps", "20", "--batch-size", "4", "--chunk-images", "4", "--extract-batch-size",
         "2", "--heldout", "0.2", "--device", "cpu"]


def write_coco(folder: Path, n_images: int = 10) -> tuple[Path, Path]:
    """``n_images`` PNGs (48 x 40 and 40 x 56) with a red w10 box in each and a blue w11 box in
    every other one, painted where the annotations put them, and their instances json."""
    images_dir = folder / "images"
    images_dir.mkdir(parents=True)
    g = np.random.default_rng(0)
    images, annotations = [], []
    for n in range(n_images):
        width, height = (48, 40) if n % 3 else (40, 56)
        pixels = g.integers(90, 160, (height, width, 3), dtype=np.uint8)
        picture = Image.fromarray(pixels)
        draw = ImageDraw.Draw(picture)
        boxes = [(1, [4 + n % 5, 6, 18, 16])] + ([(2, [20, 14, 16, 20])] if n % 2 else [])
        for category, (x, y, w, h) in boxes:
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=COLOURS[category])
            annotations.append({"id": len(annotations), "image_id": 100 + n,
                                "category_id": category, "bbox": [x, y, w, h], "iscrowd": 0})
        name = f"{100 + n:012d}.png"
        picture.save(images_dir / name)
        images.append({"id": 100 + n, "file_name": name, "width": width, "height": height})
    annotations.append({"id": 999, "image_id": 101, "category_id": 3, "bbox": [0, 0, 8, 8]})
    instances = folder / "instances.json"
    instances.write_text(json.dumps({"images": images, "annotations": annotations,
                                     "categories": CATEGORIES}))
    return instances, images_dir


def tiny_space(folder: Path, d_model: int = 128) -> Path:
    """An untrained VL-SAE space for the tiny LLaVA (``d_model`` wide), saved in ``folder``."""
    torch.manual_seed(0)
    config = SpaceConfig(kind="vlsae", d_model=d_model, n_concepts=32, k=4, model_name="tiny",
                         model_type="llava", site="layer_input", layer=2, has_aligner=False)
    VLSAESpace(VLSAE(d_model, 32, 4), None, config).save_pretrained(folder)
    return folder


def run(llava_dir: Path, instances: Path, images: Path, space: Path, *extra: str) -> dict:
    main(["patch-readout", "--model", str(llava_dir), "--boxes", str(instances), "--images",
          str(images), "--space", str(space), *QUICK, *extra])
    return json.loads((space / "patch_readout.json").read_text())
