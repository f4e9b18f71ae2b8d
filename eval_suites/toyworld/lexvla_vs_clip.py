"""LexVLA beside CLIP on the toy world, so each LexVLA claim is read as a comparison.

    python -m eval_suites.toyworld.lexvla_vs_clip --out DIR [--n-images 200] [--threads 1]

Both models are scored on the same held-out pairs with the same rules:

- PatchDis (LexVLA paper): patches classified by cosine against the text vectors of the class
  texts ("a red star"; bare names as a second row), mIoU against the object masks. LexVLA's
  patch vectors are its unit weights; CLIP's its last-layer patch tokens through the
  post-layernorm and the visual projection (the pooled token's path).
- Retrieval R@1/5/10 both ways (LexVLA: sparse lexical vectors; CLIP: its embeddings).
- LexVLA only: the share of lexical mass on units no training caption uses, on units naming
  nothing visible (what the overuse penalty should cut), and on units the pair's own caption
  does not use. ``--lexvla-off DIR``: a column for the same LexVLA trained without the penalty.

The table says what differs: the toy CLIP's patch tokens were trained with a per-patch presence
loss from the object masks (boxes); the toy LexVLA saw captions only.

Writes ``lexvla_vs_clip.json``, ``lexvla_vs_clip.md``, ``maps/NNNN.png`` (image, true patch
classes, each model's per-patch class) and ``heatmaps/NNNN.png`` (LexVLA's strongest units,
patch by patch).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm
from transformers import CLIPModel, CLIPProcessor

from eval_suites.reproduce.journal import atomic_write
from sae_training.lexvla.evaluate import (
    image_vectors,
    mass_share_outside,
    patch_classes,
    patch_labels,
    patch_weights,
    patchdis,
    retrieval_metrics,
    save_heatmaps,
    text_vectors,
    used_units,
)
from sae_training.lexvla.model import LexVLA
from sae_training.store import atomic_write_png, clear_numbered_pngs

from ..arguments import count, positive_int, run_parsed
from .assets_paths import toy_paths
from .lexvla_toy import (
    EVAL_SEED,
    TRAIN_PAIRS,
    class_texts,
    heldout_pairs,
    naming_units,
    training_captions,
)
from .world import CLASS_NAMES, RenderedScene

MODELS = ("lexvla", "lexvla_no_overuse", "clip")
HEADERS = {"lexvla": "LexVLA", "lexvla_no_overuse": "LexVLA, no overuse penalty",
           "clip": "CLIP"}
ROWS: tuple[tuple[str, str], ...] = (
    ("patchdis_miou", "PatchDis mIoU"), ("patch_accuracy", "patch accuracy"),
    ("patchdis_bare", "PatchDis mIoU, bare class names"),
    ("i2t_r1", "R@1 image->text"), ("i2t_r5", "R@5 image->text"),
    ("i2t_r10", "R@10 image->text"), ("t2i_r1", "R@1 text->image"),
    ("t2i_r5", "R@5 text->image"), ("t2i_r10", "R@10 text->image"),
    ("overuse_image", "image mass on units no training caption uses"),
    ("overuse_text", "text mass on units no training caption uses"),
    ("non_naming_image", "image mass on units that name nothing visible"),
    ("non_naming_text", "text mass on units that name nothing visible"),
    ("off_caption_image", "image mass on units its own caption does not use"),
    ("off_caption_text", "text mass on units its own caption does not use"),
)


@torch.no_grad()
def clip_image_embeddings(model: CLIPModel, pixel_values: Tensor, batch_size: int = 64
                          ) -> tuple[Tensor, Tensor]:
    """(pooled image embeddings [N, D], projected patch tokens [N, P, D]) from one pass: the
    patches take the pooled token's path (post-layernorm, visual projection)."""
    pooled, patches = [], []
    for i in range(0, len(pixel_values), batch_size):
        hidden = model.vision_model(pixel_values=pixel_values[i:i + batch_size]).last_hidden_state
        projected = model.visual_projection(model.vision_model.post_layernorm(hidden))
        pooled.append(projected[:, 0])
        patches.append(projected[:, 1:])
    return torch.cat(pooled), torch.cat(patches)


@torch.no_grad()
def clip_text_embeddings(model: CLIPModel, input_ids: Tensor,
                         attention_mask: Tensor | None = None) -> Tensor:
    """Projected text embeddings [N, D] (CLIP's text_embeds before normalisation)."""
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return model.text_projection(pooled)


def patch_grid_labels(scenes: list[RenderedScene], grid: int) -> Tensor:
    """Ground-truth patch classes [N, grid*grid] from the exact object masks."""
    return torch.from_numpy(np.stack([patch_labels(s.masks, grid) for s in scenes]))


def _patch_scores(dis: dict, retrieval: dict, bare: dict) -> dict:
    per_class = {CLASS_NAMES[c]: round(v, 4) for c, v in dis["per_class_iou"].items()}
    return {"patchdis_miou": dis["miou"], "patch_accuracy": dis["patch_accuracy"],
            "patchdis_bare": bare["miou"],
            **{k: retrieval[k] for k in retrieval if k.startswith(("i2t", "t2i"))},
            "n_patches": dis["n_patches"], "per_class_iou": per_class}


def measure_clip(model: CLIPModel, processor: CLIPProcessor, scenes: list[RenderedScene],
                 captions: list[str]) -> tuple[dict, Tensor]:
    """CLIP's scores and per-patch classes [N, P] on the given pairs."""
    pixels = processor(images=[s.image for s in scenes], return_tensors="pt")["pixel_values"]
    images, patches = clip_image_embeddings(model, pixels)

    def texts(batch: list[str]) -> Tensor:
        tokens = processor.tokenizer(batch, padding=True, return_tensors="pt")
        return clip_text_embeddings(model, tokens["input_ids"], tokens.get("attention_mask"))

    sim = F.normalize(images, dim=-1) @ F.normalize(texts(captions), dim=-1).T
    classes = texts(class_texts())
    labels = patch_grid_labels(scenes, round(patches.shape[1] ** 0.5))
    dis = patchdis(patches, classes, labels)
    bare = patchdis(patches, texts(class_texts("{}")), labels)
    retrieval = retrieval_metrics(sim, torch.arange(len(captions)))
    return _patch_scores(dis, retrieval, bare), patch_classes(patches, classes)


def measure_lexvla(model: LexVLA, scenes: list[RenderedScene], captions: list[str],
                   train_captions: list[str]) -> tuple[dict, Tensor]:
    """LexVLA's scores, overuse shares and per-patch classes [N, P] on the given pairs (the
    shares from the sparse inference vectors that retrieval uses; a unit is used by a caption
    as ``LexVLA.caption_words`` reads it, phrases included)."""
    images = [s.image for s in scenes]
    img, txt = image_vectors(model, images), text_vectors(model, captions)
    weights, classes = patch_weights(model, images), text_vectors(model, class_texts())
    labels = patch_grid_labels(scenes, round(weights.shape[1] ** 0.5))
    dis = patchdis(weights, classes, labels)
    bare = patchdis(weights, text_vectors(model, class_texts("{}")), labels)
    scores = _patch_scores(dis, retrieval_metrics(img @ txt.T, torch.arange(len(captions))),
                           bare)
    used = used_units(model, train_captions)
    own = model.caption_words(captions).bool().cpu()
    naming = torch.tensor([w in naming_units() for w in model.words])
    scores.update(overuse_image=mass_share_outside(img, used),
                  overuse_text=mass_share_outside(txt, used),
                  non_naming_image=mass_share_outside(img, naming),
                  non_naming_text=mass_share_outside(txt, naming),
                  off_caption_image=mass_share_outside(img, own),
                  off_caption_text=mass_share_outside(txt, own),
                  n_words=len(model.words), unused_words=[w for w, u in zip(model.words, used)
                                                          if not u])
    return scores, patch_classes(weights, classes)


def compare(lexvla: LexVLA, clip: CLIPModel, processor: CLIPProcessor, n_images: int = 200,
            seed: int = EVAL_SEED, n_train_captions: int = TRAIN_PAIRS,
            lexvla_off: LexVLA | None = None
            ) -> tuple[dict, list[RenderedScene], dict[str, Tensor]]:
    """(metrics, the held-out scenes, each model's per-patch classes) on one pair set;
    ``lexvla_off``: the same LexVLA trained without the overuse penalty (a column too)."""
    scenes, captions = heldout_pairs(n_images, seed)
    train_captions = training_captions(n_train_captions)
    measures = {"lexvla": lambda: measure_lexvla(lexvla, scenes, captions, train_captions),
                "clip": lambda: measure_clip(clip, processor, scenes, captions)}
    if lexvla_off is not None:
        measures["lexvla_no_overuse"] = lambda: measure_lexvla(lexvla_off, scenes, captions,
                                                               train_captions)
    results, classes = {}, {}
    for name in tqdm([m for m in MODELS if m in measures], desc="lexvla vs clip",
                     dynamic_ncols=True):
        results[name], classes[name] = measures[name]()
    results["eval"] = {"seed": seed, "n_images": n_images, "class_texts": class_texts(),
                       "n_train_captions": n_train_captions,
                       "lexvla_units": lexvla.words, "naming_units": sorted(naming_units())}
    return results, scenes, classes


def markdown_table(metrics: dict) -> str:
    """The LexVLA | (LexVLA without the penalty) | CLIP table; "n/a" where a measure does not
    apply to CLIP."""
    models = [m for m in MODELS if m in metrics]
    lines = [f"| measure | {' | '.join(HEADERS[m] for m in models)} |",
             "|---" * (len(models) + 1) + "|"]
    for key, label in ROWS:
        cells = [f"{metrics[m][key]:.3f}" if key in metrics[m] else "n/a" for m in models]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    e = metrics["eval"]
    lines.append(f"\n{e['n_images']} held-out pairs (seed {e['seed']}), "
                 f"{metrics['lexvla']['n_patches']} scored patches; units used by training "
                 f"captions from {e['n_train_captions']} captions. {metrics['lexvla']['n_words']} "
                 "LexVLA units. Supervision differs: CLIP's patch tokens were trained with a "
                 "per-patch presence loss from object masks (boxes); LexVLA saw captions only.")
    return "\n".join(lines) + "\n"


def save_class_maps(out: Path, scenes: list[RenderedScene], classes: dict[str, Tensor],
                    n: int) -> list[Path]:
    """One PNG per scene: the image, the true patch classes, and each model's class of the
    scored patches (those PatchDis counts; a model names every background patch too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = plt.get_cmap("tab20", len(CLASS_NAMES))
    clear_numbered_pngs(out / "maps")
    paths = []
    for i in tqdm(range(min(n, len(scenes))), desc="maps", dynamic_ncols=True):
        image = scenes[i].image.convert("RGB")
        panels: dict[str, Tensor] = {}
        for name, c in classes.items():
            truth = patch_grid_labels(scenes[i:i + 1], round(c.shape[1] ** 0.5))[0]
            panels.setdefault("truth", truth)
            panels[name] = torch.where(truth >= 0, c[i], -1)
        fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.4 * (len(panels) + 1), 3.0))
        axes[0].imshow(image)
        axes[0].set_title(textwrap.fill(", ".join(scenes[i].scene.names), 32), fontsize=6)
        for ax, (name, labels) in zip(axes[1:], panels.items()):
            side = round(len(labels) ** 0.5)
            shown = np.ma.masked_less(labels.reshape(side, side).numpy(), 0)
            ax.imshow(image)
            ax.imshow(shown, cmap=colours, vmin=-0.5, vmax=len(CLASS_NAMES) - 0.5, alpha=0.6,
                      interpolation="nearest", extent=(0, image.width, image.height, 0))
            ax.set_title(name, fontsize=8)
        for ax in axes:
            ax.axis("off")
        seen = sorted({int(c) for labels in panels.values() for c in labels if c >= 0})
        fig.legend([Patch(color=colours(c)) for c in seen], [CLASS_NAMES[c] for c in seen],
                   loc="lower center", ncol=min(len(seen), 5), fontsize=6, frameon=False)
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        path = atomic_write_png(fig, out / "maps" / f"{i:04d}.png", dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def load_models(lexvla_dir: str | Path | None = None
                ) -> tuple[LexVLA, CLIPModel, CLIPProcessor]:
    """The bundled toy CLIP and a LexVLA (default: the bundled one, beside the CLIP folder)."""
    clip_dir = toy_paths().clip
    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
    lexvla = LexVLA.from_pretrained(lexvla_dir or clip_dir.parent / "lexvla").eval()
    return lexvla, clip, CLIPProcessor.from_pretrained(clip_dir)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m eval_suites.toyworld.lexvla_vs_clip",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the table, json and maps")
    parser.add_argument("--n-images", type=positive_int, default=200, help="held-out pairs")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="held-out seed")
    parser.add_argument("--train-captions", type=positive_int, default=TRAIN_PAIRS,
                        help="training captions read for the caption vocabulary")
    parser.add_argument("--maps", type=count, default=6, help="heat-map PNGs to draw")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--lexvla", default=None, help="a LexVLA folder (default: the shipped)")
    parser.add_argument("--lexvla-off", default=None,
                        help="the same LexVLA trained without the overuse penalty (a column)")
    metrics: dict = {}
    run_parsed(parser, lambda args: metrics.update(_run(args, argv)), argv)
    return metrics


def _run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    for flag, folder in (("--lexvla", args.lexvla), ("--lexvla-off", args.lexvla_off)):
        if folder is not None and not (Path(folder) / "lexvla.json").is_file():
            raise FileNotFoundError(f"{flag} {folder}: no LexVLA there (no lexvla.json); pass a "
                                    "folder eval_suites.toyworld.lexvla_toy trained into")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    lexvla, clip, processor = load_models(args.lexvla)
    off = LexVLA.from_pretrained(args.lexvla_off).eval() if args.lexvla_off else None
    metrics, scenes, classes = compare(lexvla, clip, processor, args.n_images, args.seed,
                                       args.train_captions, off)
    metrics["command"] = " ".join(["python -m eval_suites.toyworld.lexvla_vs_clip",
                                   *(sys.argv[1:] if argv is None else argv)])
    table = markdown_table(metrics)
    atomic_write(out / "lexvla_vs_clip.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write(out / "lexvla_vs_clip.md", f"# LexVLA beside CLIP\n\n`{metrics['command']}`"
                                            f"\n\n{table}")
    save_class_maps(out, scenes, classes, args.maps)
    save_heatmaps(lexvla, [s.image for s in scenes[:args.maps]], out / "heatmaps",
                  titles=[", ".join(s.scene.names) for s in scenes[:args.maps]])
    print(table)
    return metrics


if __name__ == "__main__":
    main()
