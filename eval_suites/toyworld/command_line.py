"""The toy world's command line: its parser, one subcommand per command (``__main__`` runs
them)."""

from __future__ import annotations

import argparse

from ..arguments import json_target, positive_int, probability, seed_list


def build_parser(prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """Every toy-world command's arguments; the command's name lands in ``args.command``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train",
                       help="train the toy CLIP and LLaVA (about 25 minutes on 2 CPU cores)")
    p.add_argument("--out", required=True, help="folder for clip/, llava/, train.log")
    p.add_argument("--fresh", action="store_true",
                   help="retrain every stage (without it a stage finished under the same "
                        "settings is reused, one killed midway goes on from its last save, "
                        "every 50 steps, and one trained under others is refused)")
    for name, typ in [("seed", int), ("clip_steps", positive_int), ("clip_batch", positive_int),
                      ("llava_steps", positive_int), ("threads", positive_int), ("device", str)]:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, default=None)
    p.add_argument("--clip-hidden-prob", type=probability, default=None,
                   help="hidden-partner probability of the CLIP stage's scenes (default 0: the "
                        "tower sees only visible partners; the LLaVA stage keeps the world's "
                        "0.3)")

    p = sub.add_parser("train-spaces", help="train the VL-SAE spaces of the toy LLaVA and CLIP, "
                       "and the LLaVA's grounding readouts (a few minutes)")
    p.add_argument("--models", default=None,
                   help="folder holding llava/ and clip/ (default: the shipped toy models)")
    p.add_argument("--work", required=True, help="scratch folder for pairs, activations and runs")
    p.add_argument("--readout-only", action="store_true",
                   help="only refit the LLaVA space's word and phrase readouts (on "
                        "training-distribution pairs) and its grounding readouts")
    p.add_argument("--oracle-readout-data", action="store_true",
                   help="ORACLE, upper bound only: fit readouts on pairs drawn WITHOUT the pair "
                        "prior (data no user can draw) into llava/vlsae_space_oracle/ for the "
                        "vlsae-oracle-data method; the shipped space's readouts and "
                        "steering.json are left alone")

    p = sub.add_parser("grounding", help="fit mode grounding's patch readouts (boxes; captions "
                                         "only) on training-distribution scenes (a few minutes)")
    p.add_argument("--out", required=True,
                   help="LLaVA folder to write into: OUT/vlsae_space/patch_readout.safetensors "
                        "and OUT/patch_readout_captions/ (the shipped ones: "
                        "eval_suites/toyworld/assets/llava)")
    _model_argument(p)
    _readout_fit_arguments(p)

    p = sub.add_parser("grounding-probe", help="the box readout of mode grounding on raw states "
                       "and on the space's codes: held-out AUCs (several minutes)")
    _model_argument(p, "LLaVA folder with its vlsae_space")
    _readout_fit_arguments(p)
    p.add_argument("--json", required=True, type=json_target,
                   help="where to write the result (and .md beside)")

    p = sub.add_parser("evaluate", help="score a decoding method on held-out scenes (POPE + CHAIR)")
    p.add_argument("--method", default="greedy")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n-images", type=positive_int, default=200)
    p.add_argument("--batch-size", type=positive_int, default=32)
    _model_argument(p)
    p.add_argument("--json", required=True, type=json_target,
                   help="where to write the result")
    p.add_argument("--answers", default=None,
                   help="JSONL the answers are appended to as they come; rerun the same command "
                        "after a kill and it resumes (default: beside --json, .answers.jsonl)")
    _decoding_arguments(p)

    p = sub.add_parser("export", help="write a seed's held-out scenes as webdataset shards, "
                       "POPE files, CHAIR truth")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n-images", type=positive_int, default=200)
    p.add_argument("--out", required=True)
    p.add_argument("--pairs", action="store_true",
                   help="write only training-distribution image-caption shards (for "
                        "sae_training extract)")

    p = sub.add_parser("compare", help="every method on the same scenes: compare.json, "
                       "compare.md, compare.png")
    p.add_argument("--methods", default=None,
                   help="comma-separated (default: every registered method)")
    p.add_argument("--seed", type=seed_list, default="1",
                   help="a held-out seed, or several comma-separated (2,3,4): each into "
                        "OUT/seed-<S>/, and OUT/compare.* the mean and range over them")
    p.add_argument("--n-images", type=positive_int, default=200)
    p.add_argument("--batch-size", type=positive_int, default=32)
    _model_argument(p)
    p.add_argument("--out", required=True,
                   help="folder for compare.{json,md,png} and each method's answers "
                        "(<method>.answers.jsonl, appended as they come: rerun after a kill "
                        "and it resumes)")
    _decoding_arguments(p)

    p = sub.add_parser("evidence", help="does the image side show more about absent partners "
                       "than the model's answers use?")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--n-images", type=positive_int, default=300)
    p.add_argument("--n-train", type=positive_int, default=3000,
                   help="training-distribution scenes the probes are fitted on")
    _model_argument(p)
    p.add_argument("--json", required=True, type=json_target,
                   help="where to write the result")
    return parser


def _model_argument(p: argparse.ArgumentParser, what: str = "LLaVA folder") -> None:
    """``--model``: the LLaVA a command runs, the shipped one by default."""
    p.add_argument("--model", default=None, help=f"{what} (default: the shipped toy model)")


def _readout_fit_arguments(p: argparse.ArgumentParser) -> None:
    """What a patch readout is fitted on, scored on, and for how long."""
    p.add_argument("--n-train", type=positive_int, default=3000,
                   help="training-distribution scenes fitted on")
    p.add_argument("--n-heldout", type=positive_int, default=200,
                   help="seed-1 scenes the AUCs are measured on")
    p.add_argument("--steps", type=positive_int, default=400, help="Adam steps per readout")


def _decoding_arguments(p: argparse.ArgumentParser) -> None:
    """Greedy or seeded sampling, for every method of an ``evaluate`` or ``compare``."""
    p.add_argument("--sample", action="store_true",
                   help="every method decodes with plain T=1 sampling (the papers' protocol) "
                        "instead of greedy")
    p.add_argument("--sample-seed", type=int, default=55,
                   help="seed of the sampled answers (each batch is seeded from it and its "
                        "first question, so reruns give the same answers)")
