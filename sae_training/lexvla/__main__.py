"""``python -m sae_training.lexvla {train,evaluate}``: train LexVLA on image-caption pairs, or
score a trained one on a retrieval set (a folder of images + a captions file)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sae_training.cli import positive_int


def _train(args: argparse.Namespace) -> None:
    from sae_training.lexvla.config import LexVLAConfig, LexVLATrainConfig
    from sae_training.lexvla.train import train

    model = LexVLAConfig(
        text_model=args.text_model, backbone=args.backbone,
        backbone_config=_json_flag("--backbone-config", args.backbone_config),
        freeze_backbone=not args.unfreeze_backbone, prompt=args.prompt,
        vocabulary=Path(args.vocabulary).read_text().split() if args.vocabulary else None,
        phrases=([line.strip() for line in Path(args.phrases).read_text().splitlines()
                  if line.strip()] if args.phrases else None),
        image_size=args.image_size)
    config = LexVLATrainConfig(
        data=args.data, out=args.out, model=model, vlm=args.vlm, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, lora_lr=args.lora_lr,
        backbone_lr=args.backbone_lr, temperature=args.temperature,
        overuse_weight=args.overuse_weight, caption_word_weight=args.caption_word_weight,
        presence_weight=args.presence_weight,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        mixed_precision=args.mixed_precision, seed=args.seed,
        max_samples=args.max_samples, resume=not args.no_resume)
    print(json.dumps(train(config, skip_bad=args.skip_bad), indent=2))


def _json_flag(flag: str, text: str | None) -> dict | None:
    """A flag's JSON value (None when not given), its parse error naming the flag."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as err:
        raise ValueError(f"{flag} is not valid JSON ({err}): {text!r}") from None


def _evaluate(args: argparse.Namespace) -> None:
    from PIL import Image

    from sae_training.lexvla.evaluate import (
        evaluate_retrieval,
        load_caption_set,
        save_heatmaps,
    )
    from sae_training.lexvla.model import LexVLA
    from vlsae_hooks.placement import requested_device

    device = requested_device(args.device)
    model = LexVLA.from_pretrained(args.model).to(device)
    paths, captions, text_image = load_caption_set(args.images, args.captions, args.split)
    images = [Image.open(p).convert("RGB") for p in paths]
    metrics = evaluate_retrieval(model, images, captions, text_image, args.batch_size)
    if args.heatmaps:
        save_heatmaps(model, images[:args.n_heatmaps], args.heatmaps)
    print(json.dumps(metrics, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")


def main(argv: list[str] | None = None, prog: str = "python -m sae_training.lexvla") -> None:
    threads = argparse.ArgumentParser(add_help=False)  # before or after the subcommand
    threads.add_argument("--threads", type=positive_int, default=argparse.SUPPRESS,
                         help="torch CPU threads (default: torch's)")
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     parents=[threads])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a LexVLA (saved to OUT/model)", parents=[threads])
    p.add_argument("--data", required=True, help="webdataset shards, .tsv/.csv, parquet or hf:NAME")
    p.add_argument("--out", required=True)
    p.add_argument("--text-model", required=True, help="Llama-family LM, or a llava-hf folder")
    p.add_argument("--backbone", default=None, help="Dinov2Model folder or hub id")
    p.add_argument("--backbone-config", default=None,
                   help="JSON Dinov2Config fields for a random-init backbone (toy runs)")
    p.add_argument("--unfreeze-backbone", action="store_true",
                   help="train the backbone too (needed for random-init toy backbones; the "
                        "paper keeps DINOv2 frozen)")
    p.add_argument("--prompt", default="{caption} This text means in one word:")
    p.add_argument("--vocabulary", default=None,
                   help="file of kept words (token strings), whitespace-separated; default: "
                        "alphabetic tokens of >= 2 letters that are not stopwords")
    p.add_argument("--phrases", default=None,
                   help="file of multi-word units, one per line (e.g. 'hot dog'), after the words")
    p.add_argument("--vlm", default=None, help="VLM whose tokenizer the space is mapped onto")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-lr", type=float, default=1e-4)
    p.add_argument("--backbone-lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--overuse-weight", type=float, default=0.1)
    p.add_argument("--caption-word-weight", type=float, default=0.0,
                   help="cross-entropy towards each caption's own kept words (0 = the paper)")
    p.add_argument("--presence-weight", type=float, default=0.0,
                   help="caption-level multiple-instance presence loss (0 = the paper)")
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--checkpoint-every", type=positive_int, default=500,
                   help="steps between checkpoints, where a killed run goes on from")
    p.add_argument("--log-every", type=positive_int, default=50)
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="auto: bf16 on GPU, none on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--skip-bad", action="store_true",
                   help="train on the readable pairs of damaged shards (cut or unreadable "
                        "tars); without it a damaged shard stops the run once read")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="zero-shot retrieval R@1/5/10 on images + captions",
                       parents=[threads])
    p.add_argument("--model", required=True, help="a saved LexVLA folder")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--captions", required=True,
                   help="COCO captions json, Karpathy json, json list or image<TAB>caption tsv")
    p.add_argument("--split", default=None, help="Karpathy split to keep (e.g. test)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", default=None,
                   help="where the model runs (default: cuda when there is one, else cpu)")
    p.add_argument("--heatmaps", default=None, help="folder for per-image word heat-map PNGs")
    p.add_argument("--n-heatmaps", type=positive_int, default=8)
    p.add_argument("--json", default=None, help="also write the metrics here")
    p.set_defaults(func=_evaluate)

    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except (ValueError, OSError) as err:  # bad settings, data or paths (JSON errors included)
        parser.exit(2, f"error: {err}\n")
    except KeyboardInterrupt:  # training checkpoints as it goes
        parser.exit(130, "interrupted; train goes on from its last checkpoint when the same "
                         "command is run again\n")


if __name__ == "__main__":
    main()
