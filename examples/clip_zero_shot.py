#!/usr/bin/env python
r"""CLIP zero-shot classification in concept space: CLIP's own score, the concept-level score,
and their mix (``vlsae_hooks.clip.zero_shot_classify``).

    python examples/clip_zero_shot.py                             # the shipped toy CLIP, toy scenes
    python examples/clip_zero_shot.py --model openai/clip-vit-base-patch32 --space PATH \
        --images cat.jpg dog.jpg --classes cat dog car --template "a photo of a {}."
"""

from __future__ import annotations

import argparse
import math

import torch
from PIL import Image
from transformers import AutoConfig, CLIPModel, CLIPProcessor

import vlsae_hooks
from eval_suites.arguments import model_id, run_parsed
from eval_suites.toyworld.assets_paths import toy_paths
from vlsae_hooks.clip import CLIP_MODEL_TYPES, zero_shot_classify


def share(text: str) -> float:
    """argparse type of --weight: a share of the mix, so a finite number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def template(text: str) -> str:
    """argparse type of --template: a prompt with '{}' where each class name goes."""
    if "{}" not in text:
        raise argparse.ArgumentTypeError(f"needs '{{}}' where the class name goes (every class "
                                         f"would get the same prompt), got {text!r}")
    return text


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=model_id, default=None,
                        help="CLIPModel folder or hub id (default: the toy CLIP)")
    parser.add_argument("--space", default=None,
                        help="concept space trained on the model's projected embeddings "
                        "(default: the one shipped in its vlsae_space/ folder)")
    parser.add_argument("--images", nargs="+", default=None,
                        help="image files (default: 8 toy scenes)")
    parser.add_argument("--classes", nargs="+", default=None,
                        help="class names (default: the toy world's)")
    parser.add_argument("--template", type=template, default="there is a {} .",
                        help="prompt around each class name")
    parser.add_argument("--weight", type=share, default=0.5,
                        help="share of the concept score in the mix, in [0, 1]")
    return parser


def run(args: argparse.Namespace) -> None:
    """Load the model and space, score the images three ways, print each's top class."""
    model_path = args.model or str(toy_paths().clip)
    model_type = AutoConfig.from_pretrained(model_path).model_type
    if model_type not in CLIP_MODEL_TYPES:  # CLIPModel would load it with random weights
        raise ValueError(f"{model_path} is a {model_type!r} model, not a CLIP one (CLIPModel): "
                         "pass a CLIP folder or hub id")
    model = CLIPModel.from_pretrained(model_path).eval()
    processor = CLIPProcessor.from_pretrained(model_path)
    space_path = args.space or vlsae_hooks.find_space(model)
    if space_path is None:
        raise SystemExit(f"no concept space for {model_path}; pass --space "
                         "(train one with examples/train_space.sh)")
    space = vlsae_hooks.load_space(space_path)

    truths = None
    if args.images:
        images = [Image.open(p).convert("RGB") for p in args.images]
    else:
        from eval_suites.toyworld.world import heldout_scenes

        scenes = heldout_scenes(seed=1, n=8)
        images, truths = [s.image for s in scenes], [set(s.scene.names) for s in scenes]
    if args.classes:
        classes = args.classes
    else:
        from eval_suites.toyworld.world import CLASS_NAMES

        classes = list(CLASS_NAMES)
    prompts = processor(text=[args.template.format(c) for c in classes], return_tensors="pt",
                        padding=True)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        scores = zero_shot_classify(model, space, pixels, prompts["input_ids"],
                                    prompts.get("attention_mask"), weight=args.weight)
    for kind in ("plain", "concept", "combined"):
        top = [classes[i] for i in getattr(scores, kind).argmax(-1).tolist()]
        line = f"{kind:>8}: {top}"
        if truths is not None:  # a scene holds several objects: a hit is naming any of them
            line += f"  hit rate {sum(t in truth for t, truth in zip(top, truths)) / len(top):.2f}"
        print(line)


def main(argv: list[str] | None = None) -> None:
    run_parsed(arguments(), run, argv)


if __name__ == "__main__":
    main()
