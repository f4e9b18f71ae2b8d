#!/usr/bin/env python
r"""Generate with a vision-language model (llava-hf LLaVA-1.5 / LLaVA-NeXT, Qwen2.5-VL), plain and
steered through its VL-SAE concept space, in one batch.

    python examples/generate.py                                   # the shipped toy LLaVA
    python examples/generate.py --model llava-hf/llava-1.5-7b-hf --space PATH --images a.jpg b.jpg \
        --prompt "Describe the image." --load-in-4bit
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import vlsae_hooks
from eval_suites.arguments import model_id, positive_int, run_parsed
from eval_suites.toyworld.assets_paths import toy_paths


def load(model: str, load_in_4bit: bool):
    kwargs = {"dtype": "auto", "device_map": "cuda" if torch.cuda.is_available() else "cpu"}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True)
    processor = AutoProcessor.from_pretrained(model)
    processor.tokenizer.padding_side = "left"  # batched generation pads on the left
    return AutoModelForImageTextToText.from_pretrained(model, **kwargs).eval(), processor


def default_images(n: int = 2) -> list[Image.Image]:
    from eval_suites.toyworld.world import heldout_scenes

    return [s.image for s in heldout_scenes(seed=1, n=n)]


def generate(model, processor, images: list[Image.Image], prompt: str,
             max_new_tokens: int) -> list[str]:
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(images=images, text=[text] * len(images), return_tensors="pt",
                       padding=True).to(model.device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=model_id, default=None,
                        help="LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL folder or hub id "
                        "(default: the toy LLaVA)")
    parser.add_argument("--space", default=None,
                        help="concept space folder (default: the one registered "
                        "for the model or shipped in its vlsae_space/ folder)")
    parser.add_argument("--images", nargs="+", default=None,
                        help="image files (default: two toy scenes)")
    parser.add_argument("--prompt", default="Describe the image.")
    parser.add_argument("--mode", choices=vlsae_hooks.mode_names(), default=None,
                        help="default: what the space recommends (grounding for the toy "
                        "space), else contrast")
    parser.add_argument("--alpha", type=float, default=None,
                        help="shift strength of contrast / shift / reference mode (default 0.8; "
                        "0: no shift)")
    parser.add_argument("--strength", type=float, default=None,
                        help="strength of evidence / grounding / lexical mode")
    parser.add_argument("--max-new-tokens", type=positive_int, default=48)
    parser.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit weights")
    return parser


def run(args: argparse.Namespace) -> None:
    """Load, generate plain, attach, generate steered, print both."""
    model_path = args.model or str(toy_paths().llava)
    model, processor = load(model_path, args.load_in_4bit)
    images = ([Image.open(p).convert("RGB") for p in args.images] if args.images
              else default_images())
    plain = generate(model, processor, images, args.prompt, args.max_new_tokens)
    options = {name: value for name, value in (("alpha", args.alpha), ("mode", args.mode),
                                               ("strength", args.strength)) if value is not None}
    try:
        handle = vlsae_hooks.attach(model, args.space, **options)
    except TypeError as err:  # an option of another mode than the one steering
        raise ValueError(err) from None
    with handle:
        steered = generate(model, processor, images, args.prompt, args.max_new_tokens)
    for i, (p, s) in enumerate(zip(plain, steered)):
        print(f"[{i}] plain:   {p.strip()}\n[{i}] steered: {s.strip()}")


def main(argv: list[str] | None = None) -> None:
    run_parsed(arguments(), run, argv)


if __name__ == "__main__":
    main()
