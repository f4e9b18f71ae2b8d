r"""Train and score the toy-world LexVLA that ships in ``eval_suites/toyworld/assets/lexvla``.

    python -m eval_suites.toyworld.lexvla_toy --work /tmp/lexvla_toy \
        --out eval_suites/toyworld/assets/lexvla

Same code path as real data: pairs exported as webdataset shards, read by the VL-SAE readers,
trained by ``sae_training.lexvla``. Toy choices:

- the text side is the toy LLaVA's own language model (its LM head is the words' text codebook,
  so the lexical words are exactly the toy LLaVA's tokens);
- the units are every token of that LM (special tokens aside: 53 words, most of which name
  nothing an image shows and some no caption ever uses) plus one phrase unit per colour-shape
  phrase a caption can use ("red star", "white disc": 28), because what one patch shows is a
  colour bound to a shape, which no single word names;
- the backbone is a tiny random-init DINOv2 (image 64, patch 8, width 128, 3 layers), trained
  along (frozen random features are too weak; real DINOv2 checkpoints stay frozen by default);
- beside InfoNCE + overuse, the caption-level multiple-instance presence loss
  (``presence_weight``; captions only, no boxes): a 4-layer toy LM does not know what its words
  mean the way Llama-2 does, so the units are anchored to the caption's own words (the earlier
  softmax caption-word loss, ``caption_word_weight``, is off: over a vocabulary with function
  words it spreads each caption over "the", "a", "." and learned slower in a 400-step trial).

``--overuse-weight 0`` trains the same model without the overuse penalty (the ablation
``lexvla_vs_clip --lexvla-off`` reads).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from sae_training.lexvla.config import LexVLAConfig, LexVLATrainConfig
from sae_training.lexvla.evaluate import (
    evaluate_retrieval,
    image_vectors,
    mass_share_outside,
    patch_labels,
    patch_weights,
    patchdis,
    save_heatmaps,
    text_vectors,
    used_units,
)
from sae_training.lexvla.losses import top_words
from sae_training.lexvla.model import LexVLA, load_tokenizer
from sae_training.lexvla.train import MODEL_DIR, train

from ..arguments import positive_int, run_parsed
from ..reproduce.journal import atomic_write
from .assets_paths import TOY_DIR
from .export import training_pairs
from .language import caption
from .world import (
    CLASS_NAMES,
    COLOURS,
    SHAPE_SYNONYMS,
    STREAM_PAIRS,
    RenderedScene,
    class_synonyms,
    heldout_scenes,
    sample_scene,
    scene_rng,
)

TOY_PROMPT = "{caption} the image shows a"
EVAL_SEED = 7
TRAIN_PAIRS = 12_000
STEPS = 2400
OVERUSE_WEIGHT = 0.1
PRESENCE_WEIGHT = 5.0
CAPTION_WORD_WEIGHT = 0.0
CLASS_TEMPLATE = "a {}"
"""PatchDis class texts: "a red star", the phrase as captions write it (bare names too)."""


def class_texts(template: str = CLASS_TEMPLATE) -> list[str]:
    """The texts PatchDis classifies patches by: each class name in ``template``."""
    return [template.format(name) for name in CLASS_NAMES]


def toy_words() -> list[str]:
    """The colour and shape words (shape synonyms included): what an image can show."""
    return list(COLOURS) + [w for words in SHAPE_SYNONYMS.values() for w in words]


def toy_phrases() -> list[str]:
    """Every colour-shape phrase a caption can name an object with ("red star", "white disc")."""
    return [p for c in range(len(CLASS_NAMES)) for p in class_synonyms(c)]


def lm_words(llava: Path) -> list[str]:
    """Every token of the toy LLaVA's tokenizer except its special tokens, in id order."""
    tokenizer = load_tokenizer(str(llava))
    special = set(tokenizer.all_special_tokens) | {"<image>"}
    vocab = tokenizer.get_vocab()
    return [t for t in sorted(vocab, key=vocab.get) if t not in special]


def naming_units() -> set[str]:
    """The units that name something an image shows: colours, shapes and their phrases."""
    return set(toy_words()) | set(toy_phrases())


def toy_config(llava: Path, data: Path, out: Path, steps: int = STEPS,
               overuse_weight: float = OVERUSE_WEIGHT) -> LexVLATrainConfig:
    words = lm_words(llava)
    model = LexVLAConfig(
        text_model=str(llava), prompt=TOY_PROMPT, vocabulary=words, phrases=toy_phrases(),
        backbone_config=dict(image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=3,
                             num_attention_heads=4, mlp_ratio=4),
        freeze_backbone=False, image_size=64, pixel_mean=(0.5, 0.5, 0.5),
        pixel_std=(0.5, 0.5, 0.5), adapter_heads=4, adapter_hidden=256, lora_r=8,
        lora_alpha=16, max_active=len(words) + len(toy_phrases()))
    return LexVLATrainConfig(
        data=str(data), out=str(out), model=model, steps=steps, batch_size=64, lr=1e-3,
        lora_lr=5e-4, backbone_lr=1e-3, temperature=0.05, overuse_weight=overuse_weight,
        caption_word_weight=CAPTION_WORD_WEIGHT, presence_weight=PRESENCE_WEIGHT,
        warmup_steps=50,
        max_samples=TRAIN_PAIRS, checkpoint_every=200, log_every=25)


def heldout_pairs(n_images: int = 200, seed: int = EVAL_SEED
                  ) -> tuple[list[RenderedScene], list[str]]:
    """The held-out scenes and one caption each: the pairs every toy retrieval score uses."""
    scenes = heldout_scenes(seed, n_images)
    rng = np.random.default_rng([seed, 5])
    return scenes, [caption(s.scene, rng) for s in scenes]


def training_captions(n_pairs: int = TRAIN_PAIRS, seed: int = 0) -> list[str]:
    """The captions of the pairs the toy LexVLA trains on (``export_training_pairs``), without
    rendering the images: a scene is fixed before it is drawn."""
    rng = np.random.default_rng([seed, 98])
    return [caption(sample_scene(scene_rng(seed, STREAM_PAIRS, i)), rng) for i in range(n_pairs)]


@torch.no_grad()
def evaluate_toy(model: LexVLA, n_images: int = 200, seed: int = EVAL_SEED,
                 heatmaps: Path | None = None) -> dict:
    """Retrieval, PatchDis (exact masks), sparsity and top words on held-out scenes (the top
    words and heat-maps of the first six)."""
    scenes, captions = heldout_pairs(n_images, seed)
    images = [s.image for s in scenes]
    retrieval = evaluate_retrieval(model, images, captions, list(range(n_images)))
    grid = model.config.image_size // model.space.backbone.config.patch_size
    labels = torch.from_numpy(np.stack([patch_labels(s.masks, grid) for s in scenes]))
    weights = patch_weights(model, images)
    dis = patchdis(weights, text_vectors(model, class_texts()), labels)
    bare = patchdis(weights, text_vectors(model, class_texts("{}")), labels)
    img, txt = image_vectors(model, images), text_vectors(model, captions)
    used = used_units(model, training_captions())
    naming = torch.tensor([w in naming_units() for w in model.words])
    metrics = {
        "retrieval": retrieval,
        "patchdis": dis["miou"], "patchdis_bare_names": bare["miou"], "patchdis_detail": {
            "patch_accuracy": dis["patch_accuracy"], "n_patches": dis["n_patches"],
            "per_class_iou": {CLASS_NAMES[c]: round(v, 4)
                              for c, v in dis["per_class_iou"].items()}},
        "sparsity": {"image": float((img == 0).float().mean()),
                     "text": float((txt == 0).float().mean()),
                     "image_active_words": float((img > 0).sum(1).float().mean()),
                     "text_active_words": float((txt > 0).sum(1).float().mean()),
                     "threshold": model.space.threshold, "n_words": len(model.words)},
        "overuse": {"image_unused": mass_share_outside(img, used),
                    "text_unused": mass_share_outside(txt, used),
                    "image_non_naming": mass_share_outside(img, naming),
                    "text_non_naming": mass_share_outside(txt, naming),
                    "n_unused_units": int((~used).sum()),
                    "n_non_naming_units": int((~naming).sum())},
        "examples": [{"objects": list(scenes[i].scene.names),
                      "top_words": top_words(img[i], model.words, 6)}
                     for i in range(min(6, n_images))],
        "eval": {"seed": seed, "n_images": n_images},
    }
    if heatmaps is not None:
        save_heatmaps(model, images[:6], heatmaps,
                      titles=[", ".join(s.scene.names) for s in scenes[:6]])
    return metrics


def train_toy_lexvla(work: Path, out: Path, llava: Path, steps: int = STEPS,
                     overuse_weight: float = OVERUSE_WEIGHT) -> dict:
    """Export pairs, train, evaluate, and write the model + ``metrics.json`` to ``out``."""
    config = toy_config(llava, work / "pairs", work / "run", steps, overuse_weight)
    training_pairs(work / "pairs", seed=0, n_pairs=config.max_samples)
    start = time.perf_counter()
    last = train(config)
    seconds = time.perf_counter() - start
    model = LexVLA.from_pretrained(work / "run" / MODEL_DIR)
    metrics = evaluate_toy(model, heatmaps=work / "heatmaps")
    metrics["training"] = {"steps": config.steps, "batch_size": config.batch_size,
                           "overuse_weight": config.overuse_weight,
                           "presence_weight": config.presence_weight,
                           "seconds": round(seconds, 1), "last_log": last,
                           "threads": torch.get_num_threads()}
    model.save_pretrained(out, text_model=os.path.relpath(llava.resolve(), out.resolve()))
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval_suites.toyworld.lexvla_toy",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="scratch folder: pairs, run, heat-maps")
    parser.add_argument("--out", default=str(TOY_DIR / "lexvla"),
                        help="where the trained LexVLA goes (default: the shipped toy LexVLA, "
                             "which it replaces)")
    parser.add_argument("--llava", help="the toy LLaVA folder (default: the shipped one)")
    parser.add_argument("--steps", type=positive_int, help=f"training steps (default: {STEPS})")
    parser.add_argument("--overuse-weight", type=float,
                        help=f"default {OVERUSE_WEIGHT}; 0 trains the no-penalty ablation (give "
                             "it another --out)")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--evaluate-only", action="store_true",
                        help="re-score the model in --out and rewrite its metrics.json (its "
                             "training record kept)")
    run_parsed(parser, _run, argv)


def _run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    training = [flag for flag, value in (("--llava", args.llava), ("--steps", args.steps),
                                          ("--overuse-weight", args.overuse_weight))
                if value is not None]
    if args.evaluate_only:
        if training:
            raise ValueError(f"{', '.join(training)} set how a model is trained; --evaluate-only "
                             "re-scores the model in --out as it was trained: drop them")
        out = Path(args.out)
        if not (out / "metrics.json").is_file():
            raise FileNotFoundError(f"--evaluate-only re-scores a model trained into --out, and "
                                    f"{out} holds none (no metrics.json): train it first")
        old = json.loads((out / "metrics.json").read_text())
        metrics = {**evaluate_toy(LexVLA.from_pretrained(out),
                                  heatmaps=Path(args.work) / "heatmaps"),
                   "training": old.get("training")}
        atomic_write(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        print(json.dumps({k: metrics[k] for k in ("retrieval", "patchdis", "overuse")}, indent=2))
        return
    metrics = train_toy_lexvla(Path(args.work), Path(args.out),
                               Path(args.llava or TOY_DIR / "llava"), args.steps or STEPS,
                               OVERUSE_WEIGHT if args.overuse_weight is None
                               else args.overuse_weight)
    print(json.dumps({k: metrics[k] for k in ("retrieval", "patchdis", "sparsity", "overuse",
                                              "training")},
                     indent=2))


if __name__ == "__main__":
    main()
