"""How good a LexVLA is: zero-shot retrieval, PatchDis and per-image word heat-maps.

- Retrieval R@1/5/10 in both directions from an image x caption similarity matrix (the dot
  product of the sparse unit lexical vectors), on any Flickr30k / COCO-style set: a folder of
  images plus a captions file (COCO captions json, Karpathy json, a plain json list, or a tsv
  of ``image<TAB>caption`` lines; Flickr30k's ``img.jpg#0`` keys are understood).
- PatchDis (LexVLA paper): each patch is classified by the text-side lexical vectors of the
  class names (cosine with the patch's word weights), and mIoU is taken against the ground
  truth patch labels; the same rule scores any model's patch vectors (e.g. CLIP's).
- Overuse: the share of lexical mass on words no training caption uses.
- A PNG per image: the image, then the patch heat-map of each of its strongest words.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sae_training.lexvla.losses import top_words
from sae_training.lexvla.model import LexVLA
from sae_training.store import atomic_write_png, clear_numbered_pngs

RECALL_AT = (1, 5, 10)


def retrieval_metrics(sim: Tensor, text_image: Tensor, ks: tuple[int, ...] = RECALL_AT
                      ) -> dict[str, float]:
    """R@k for image->text (``i2t``) and text->image (``t2i``).

    ``sim`` [n_images, n_texts]; ``text_image[j]`` is the image caption j describes. An image
    counts as found at rank r if r wrong captions score at least as high as its best right one
    (ties count against the model: sparse vectors tie often); likewise for a caption's image.
    """
    sim = sim.float()
    n_images = sim.shape[0]
    text_image = text_image.long()
    right = torch.zeros_like(sim, dtype=torch.bool)
    right[text_image, torch.arange(sim.shape[1])] = True
    if not bool(right.any(1).all()):
        raise ValueError("every image needs at least one caption")
    best_right = sim.masked_fill(~right, -torch.inf).amax(1, keepdim=True)
    i2t_rank = ((sim >= best_right) & ~right).sum(1)
    own = sim[text_image, torch.arange(sim.shape[1])]
    t2i_rank = (sim >= own[None, :]).sum(0) - 1
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).float().mean())
        out[f"t2i_r{k}"] = float((t2i_rank < k).float().mean())
    out["n_images"], out["n_texts"] = n_images, sim.shape[1]
    return out


def load_caption_set(images: str | Path, captions: str | Path, split: str | None = None
                     ) -> tuple[list[Path], list[str], list[int]]:
    """(image paths, captions, image index of each caption) from a folder + captions file.

    ``split`` filters Karpathy-json entries (e.g. "test"); other formats have no splits.
    """
    folder, path = Path(images), Path(captions)
    pairs: list[tuple[str, str]] = []
    data = json.loads(path.read_text()) if path.suffix.lower() == ".json" else None
    if split is not None and not (isinstance(data, dict) and "images" in data
                                  and "annotations" not in data):
        raise ValueError(f"split={split!r} selects entries of a Karpathy-split json; "
                         f"{path} has no splits: leave the split out")
    if data is not None:
        if isinstance(data, dict) and "annotations" in data:  # COCO captions
            names = {im["id"]: im["file_name"] for im in data["images"]}
            pairs = [(names[a["image_id"]], a["caption"]) for a in data["annotations"]]
        elif isinstance(data, dict) and "images" in data:  # Karpathy splits
            pairs = [(im["filename"], s["raw"]) for im in data["images"]
                     if split is None or im.get("split") == split for s in im["sentences"]]
        else:  # [{"image": ..., "caption": ... | "captions": [...]}]
            for row in data:
                texts = row["captions"] if "captions" in row else [row["caption"]]
                pairs += [(row["image"], t) for t in texts]
    else:
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):  # '"' is text
                if len(row) >= 2:
                    pairs.append((row[0].split("#")[0], row[1]))
    if not pairs:
        raise ValueError(f"no captions read from {path}")
    order: dict[str, int] = {}
    text_image = [order.setdefault(name, len(order)) for name, _ in pairs]
    paths = [folder / name for name in order]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images missing, e.g. {missing[0]}")
    return paths, [t.strip() for _, t in pairs], text_image


@torch.no_grad()
def image_vectors(model: LexVLA, images: list[Image.Image], batch_size: int = 64) -> Tensor:
    """Sparse (inference) lexical image vectors [N, V]."""
    return torch.cat([model.image_vectors(model.pixels(images[i:i + batch_size]), sparse=True)
                      for i in range(0, len(images), batch_size)]).cpu()


@torch.no_grad()
def text_vectors(model: LexVLA, captions: list[str], batch_size: int = 256) -> Tensor:
    """Sparse (inference) lexical caption vectors [N, V]."""
    return torch.cat([model.text_vectors(captions[i:i + batch_size], sparse=True)
                      for i in range(0, len(captions), batch_size)]).cpu()


def evaluate_retrieval(model: LexVLA, images: list[Image.Image], captions: list[str],
                       text_image: list[int], batch_size: int = 64) -> dict[str, float]:
    sim = image_vectors(model, images, batch_size) @ text_vectors(model, captions).T
    return retrieval_metrics(sim, torch.tensor(text_image))


def patch_labels(masks: np.ndarray, grid: int, min_cover: float = 0.5) -> np.ndarray:
    """Per-patch class from pixel masks [C, H, W]: the class covering most of the patch if it
    covers at least ``min_cover`` of it, else -1 (background, not scored). Returns [grid*grid]."""
    c, h, w = masks.shape
    cover = masks.reshape(c, grid, h // grid, grid, w // grid).mean(axis=(2, 4)).reshape(c, -1)
    label = cover.argmax(0)
    return np.where(cover.max(0) >= min_cover, label, -1)


def patch_classes(patch_vectors: Tensor, class_vectors: Tensor) -> Tensor:
    """Class of each patch [N, P]: the argmax of its cosine with the class vectors [C, D].

    Any patch representation works (lexical word weights, CLIP's projected patch tokens), so
    PatchDis compares models under one rule.
    """
    patches = F.normalize(patch_vectors.float(), dim=-1)
    return (patches @ F.normalize(class_vectors.float(), dim=-1).T).argmax(-1)


def patchdis(patch_vectors: Tensor, class_vectors: Tensor, labels: Tensor) -> dict:
    """mIoU of classifying patches by the class names' text vectors.

    ``patch_vectors`` [N, P, D] (for LexVLA the word weights per patch), ``class_vectors``
    [C, D], ``labels`` [N, P] (class index, -1 = not scored). IoU_c = TP / (TP + FP + FN) over
    the scored patches; the mean runs over classes that occur in the ground truth.
    """
    predicted = patch_classes(patch_vectors, class_vectors)
    scored = labels >= 0
    truth, guess = labels[scored], predicted[scored]
    n_classes = class_vectors.shape[0]
    ious = {}
    for c in range(n_classes):
        tp = int(((guess == c) & (truth == c)).sum())
        fn = int(((guess != c) & (truth == c)).sum())
        fp = int(((guess == c) & (truth != c)).sum())
        if tp + fn > 0:
            ious[c] = tp / (tp + fp + fn)
    return {"miou": float(np.mean(list(ious.values()))) if ious else 0.0,
            "patch_accuracy": float((truth == guess).float().mean()) if len(truth) else 0.0,
            "per_class_iou": ious, "n_patches": int(scored.sum())}


def caption_words(captions: list[str]) -> set[str]:
    """The lower-cased whitespace-separated words of ``captions`` (a caption vocabulary)."""
    return {w for text in captions for w in text.lower().split()}


def used_units(model: LexVLA, captions: list[str], batch_size: int = 1024) -> Tensor:
    """[V] bool: which of the model's units (words and phrases) some caption contains, by the
    model's own tokenizer (what ``caption_words`` targets)."""
    used = torch.zeros(len(model.words), dtype=torch.bool)
    for i in range(0, len(captions), batch_size):
        used |= model.caption_words(captions[i:i + batch_size]).bool().any(0).cpu()
    return used


def mass_share_outside(vectors: Tensor, allowed: Tensor) -> float:
    """Share of the total mass of ``vectors`` [N, V] on words where ``allowed`` ([V] or [N, V],
    bool) is False. With ``allowed`` = the words training captions use, this is the mass on
    meaningless words that LexVLA's overuse penalty is meant to cut."""
    mass = vectors.float().clamp(min=0)
    total = float(mass.sum())
    return float((mass * ~allowed).sum()) / total if total > 0 else 0.0


@torch.no_grad()
def patch_weights(model: LexVLA, images: list[Image.Image], batch_size: int = 64) -> Tensor:
    """Per-patch word weights elu(scores) + 1, [N, P, V]."""
    space = model.space
    return torch.cat([
        space.patch_lexical(space.patch_features(model.pixels(images[i:i + batch_size])))
        for i in range(0, len(images), batch_size)]).cpu()


def save_heatmaps(model: LexVLA, images: list[Image.Image], out: str | Path, top_k: int = 4,
                  titles: list[str] | None = None) -> list[Path]:
    """One PNG per image, ``out/NNNN.png`` (an earlier call's replaced): the image and the patch
    heat-maps of its ``top_k`` strongest words."""
    clear_numbered_pngs(out)
    if not images:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vectors, weights = image_vectors(model, images), patch_weights(model, images)
    grid = round(weights.shape[1] ** 0.5)
    paths = []
    for i, image in enumerate(images):
        words = top_words(vectors[i], model.words, top_k)
        fig, axes = plt.subplots(1, top_k + 1, figsize=(2.2 * (top_k + 1), 2.5))
        shown = image.convert("RGB").resize((model.config.image_size,) * 2)
        axes[0].imshow(shown)
        axes[0].set_title(titles[i] if titles else "image", fontsize=7)
        for ax, (word, value) in zip(axes[1:], words):
            heat = weights[i, :, model.words.index(word)].reshape(grid, grid).numpy()
            ax.imshow(shown)
            ax.imshow(heat, cmap="magma", alpha=0.6, interpolation="nearest",
                      extent=(0, shown.width, shown.height, 0))
            ax.set_title(f"{word} {value:.2f}", fontsize=8)
        for ax in axes:
            ax.axis("off")
        fig.tight_layout()
        path = out / f"{i:04d}.png"
        atomic_write_png(fig, path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths
