r"""``python -m vlsae_hooks convert``: turn the reference's released weights into a space folder.

    python -m vlsae_hooks convert --sae llava_256_8_best.pth --aux llava_aux_best.pt \
        --out spaces/ref
    python -m vlsae_hooks convert --sae openclip_ViT-B-32_VL_SAE_256_8_best.pth --out spaces/clip

The folder (model.safetensors + config.json with ``source: reference``) then loads without
``torch.load``: ``attach(model, "spaces/ref")``.
"""

from __future__ import annotations

import argparse
import json

from vlsae_hooks.convert import REFERENCE_DEPTH, convert_reference


def _convert(args: argparse.Namespace) -> None:
    space = convert_reference(args.sae, args.out, args.aux, overwrite=args.overwrite,
                              model_type=args.model_type, k=args.k, layer=args.layer,
                              n_layers=args.n_layers, model_name=args.model_name)
    summary = space.config.to_dict()
    if summary["site"] == "layer_input":
        summary["steered_by_default"] = f"output of decoder layer {summary['layer']}"
    print(json.dumps({"out": str(args.out), **summary}, indent=2))


def main(argv: list[str] | None = None, prog: str = "python -m vlsae_hooks") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="convert the reference's .pth (+ aux .pt) to a space folder")
    p.add_argument("--sae", required=True, help="the reference SAE state dict (.pth)")
    p.add_argument("--aux", default=None,
                   help="its auxiliary alignment state dict (.pt); LLaVA only")
    p.add_argument("--out", required=True, help="folder to write model.safetensors + config.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a space already in --out, removing its readouts and "
                        "metrics.json (they describe the old weights)")
    p.add_argument("--model-type", choices=("llava", "clip"), default=None,
                   help="default: llava when --aux is given, else clip")
    p.add_argument("--k", type=int, default=None,
                   help="active concepts per row (default: from the reference's file name, "
                        "llava_{k}_{expansion}_best.pth, else 256 with a warning)")
    p.add_argument("--layer", type=int, default=None,
                   help="decoder layer whose INPUT the SAE was trained on (reference: 30); "
                        "attach steers its output by default")
    p.add_argument("--n-layers", type=int, default=REFERENCE_DEPTH,
                   help="decoder depth of the target model; without --layer the site is placed "
                        "as far from the end as the reference's (30 of 32)")
    p.add_argument("--model-name", default=None,
                   help="model recorded in the config (default llava-hf/llava-1.5-7b-hf or the "
                        "OpenCLIP architecture in the file name)")
    p.set_defaults(func=_convert)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as err:  # bad weights or options; a path that cannot be used
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
