"""``python -m eval_suites.reproduce {pope,chair}``: the VL-SAE paper's protocols in one command.

    python -m eval_suites.reproduce pope --model llava-1.5-7b-hf --space llava_256_8_best.pth \\
        --aux llava_aux_best.pt --questions coco_pope_random.json --images val2014/ --out results/
    python -m eval_suites.reproduce chair --model llava-1.5-7b-hf --space spaces/ref \\
        --images val2014/ --annotations instances_val2014.json --synonyms synonyms.txt \\
        --out results/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..arguments import positive_int
from ..run_log import run_log
from .chair import (
    CHAIR_ALPHA,
    CHAIR_MAX_NEW_TOKENS,
    CHAIR_N_IMAGES,
    CHAIR_PROMPT,
    coco_ground_truth,
    read_ground_truth,
    read_synonyms,
    run_chair,
)
from .methods import LLAVA_V1_SYSTEM, METHOD_MODES, REALIGNMENT_MODES
from .pope import POPE_ALPHA, POPE_MAX_NEW_TOKENS, POPE_SUFFIX, run_pope
from .settings import DECODINGS, DTYPES, REFERENCE_SEED, RunSettings


def _common(p: argparse.ArgumentParser, alpha: float, max_new_tokens: int) -> None:
    p.add_argument("--model", required=True,
                   help="llava-hf LLaVA-1.5 / LLaVA-NeXT or Qwen2.5-VL folder or hub id")
    p.add_argument("--method", choices=sorted(METHOD_MODES), default="vlsae",
                   help="regular / greedy / sample: the plain model, decoded as --decoding "
                        "says / always greedy / always T=1 sampling; vlsae: what the space "
                        "recommends (its steering.json; else contrast); vlsae-contrast: cached "
                        "contrast steering; vlsae-shift: shift only; vlsae-reference: the "
                        "reference's uncached two-pass decoding; vlsae-evidence: the space's "
                        "readouts as evidence; vlsae-grounding: its patch readout, per patch "
                        "(fit with `vlsae patch-readout`) (default: vlsae)")
    p.add_argument("--space", default=None,
                   help="saved space folder, or the reference's SAE .pth (default: the space "
                        "shipped in the model folder)")
    p.add_argument("--aux", default=None, help="the reference's auxiliary .pt (LLaVA .pth only)")
    p.add_argument("--out", required=True,
                   help="folder for the answers (appended as they come: rerun the same command "
                        "after a kill and it resumes) and the JSON + Markdown report")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N items")
    p.add_argument("--decoding", choices=DECODINGS, default="sample")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling only (default: 1)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sampling only, in (0, 1] (default: 1)")
    p.add_argument("--num-beams", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=REFERENCE_SEED)
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens)
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--system-prompt", default=LLAVA_V1_SYSTEM,
                   help="system line before USER: (default: LLaVA-1.5's llava_v1; '' for none)")
    p.add_argument("--alpha", type=float, default=None,
                   help=f"shift strength (vlsae-contrast / -shift / -reference: {alpha} unless "
                        "given; vlsae: the space's recommendation unless given)")
    p.add_argument("--image-weight", type=float, default=None,
                   help="weight of the image's concepts in the mixed code (realignment "
                        "methods: 0.9)")
    p.add_argument("--contrast-weight", type=float, default=None, help="contrast weight (0.6)")
    p.add_argument("--plausibility-cutoff", type=float, default=None,
                   help="plausibility cutoff (0.8)")
    p.set_defaults(protocol_alpha=alpha)
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--site", choices=("input", "output"), default=None)
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="float16 on CUDA, float32 on CPU by default")
    p.add_argument("--device", default=None)
    p.add_argument("--load-in-4bit", action="store_true",
                   help="quantize the weights to 4 bits with bitsandbytes (fits a 7B model in "
                        "about 4-5 GB; changes the numbers slightly)")
    p.add_argument("--device-map", default=None,
                   help="from_pretrained's device_map, e.g. 'auto' to spread the model over "
                        "the GPUs and the CPU")


def _settings(args: argparse.Namespace) -> RunSettings:
    realigns = METHOD_MODES[args.method] in REALIGNMENT_MODES
    return RunSettings(
        model=args.model, method=args.method, max_new_tokens=args.max_new_tokens,
        alpha=args.protocol_alpha if args.alpha is None and realigns else args.alpha,
        space=args.space, aux=args.aux, decoding=args.decoding,
        temperature=args.temperature, top_p=args.top_p, num_beams=args.num_beams, seed=args.seed,
        batch_size=args.batch_size, system_prompt=args.system_prompt,
        image_weight=args.image_weight,
        contrast_weight=args.contrast_weight, plausibility_cutoff=args.plausibility_cutoff,
        layer=args.layer, site=args.site, dtype=args.dtype, device=args.device,
        limit=args.limit, load_in_4bit=args.load_in_4bit, device_map=args.device_map)


def _pope(args: argparse.Namespace) -> dict:
    return run_pope(_settings(args), [Path(q) for q in args.questions], Path(args.images),
                    Path(args.out), prompt_suffix=args.prompt_suffix)


def _chair(args: argparse.Namespace) -> dict:
    truth = (coco_ground_truth(args.annotations) if args.annotations
             else read_ground_truth(args.ground_truth))
    return run_chair(_settings(args), Path(args.images), truth, read_synonyms(args.synonyms),
                     Path(args.out), n_images=args.n_images, prompt=args.prompt)


def main(argv: list[str] | None = None,
         prog: str = "python -m eval_suites.reproduce") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pope", help="POPE on VCD-format question files")
    _common(p, POPE_ALPHA, POPE_MAX_NEW_TOKENS)
    p.add_argument("--questions", nargs="+", required=True,
                   help="jsonl files of {question_id, image, text, label}")
    p.add_argument("--images", required=True, help="folder holding each question's image")
    p.add_argument("--prompt-suffix", default=POPE_SUFFIX,
                   help="appended to each question (default: the reference's)")
    p.set_defaults(func=_pope)

    p = sub.add_parser("chair", help="CHAIR on 500 images chosen the reference's way")
    _common(p, CHAIR_ALPHA, CHAIR_MAX_NEW_TOKENS)
    p.add_argument("--images", required=True, help="image folder (COCO val2014)")
    truth = p.add_mutually_exclusive_group(required=True)
    truth.add_argument("--annotations", help="COCO instances_val2014.json")
    truth.add_argument("--ground-truth", help="JSON {image: [object names]}")
    p.add_argument("--synonyms", required=True,
                   help="JSON {object: [phrases]} or CHAIR's synonyms.txt")
    p.add_argument("--n-images", type=positive_int, default=CHAIR_N_IMAGES)
    p.add_argument("--prompt", default=CHAIR_PROMPT, help="default: the reference's")
    p.set_defaults(func=_chair)

    args = parser.parse_args(argv)
    try:
        with run_log(Path(args.out) / f"{args.command}.log"):
            report = args.func(args)
    except (ValueError, TypeError, OSError) as err:  # bad input: options, files, a model
        parser.exit(2, f"error: {err}\n")
    except KeyboardInterrupt:  # the answers so far are logged
        parser.exit(130, "interrupted; rerun the same command to resume\n")
    print(json.dumps({"results": report["results"], "out": args.out}, indent=2))


if __name__ == "__main__":
    main()
