"""``python -m eval_suites.toyworld {train,train-spaces,grounding,grounding-probe,evaluate,export,
compare,evidence}`` (also ``vlsae toy ...``): the toy world's commands."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from ..run_log import run_log
from .command_line import build_parser

if TYPE_CHECKING:
    from .evaluate import EvalSettings


def _train(args: argparse.Namespace) -> None:
    from .train import ToyTrainConfig, train_toy_models

    overrides = {f.name: getattr(args, f.name) for f in fields(ToyTrainConfig)
                 if getattr(args, f.name, None) is not None}
    if args.clip_hidden_prob is not None:
        from .world import WorldConfig

        overrides["clip_world"] = WorldConfig(hidden_prob=args.clip_hidden_prob)
    summary = train_toy_models(Path(args.out), ToyTrainConfig(**overrides), fresh=args.fresh)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))


def _train_spaces(args: argparse.Namespace) -> None:
    from .assets_paths import TOY_DIR
    from .grounding import fit_toy_grounding
    from .spaces import (
        ORACLE_READOUT_FOLDER,
        fit_oracle_readout,
        fit_toy_readout,
        train_toy_spaces,
    )

    models = Path(args.models or TOY_DIR)
    missing = [str(models / name) for name in ("llava", "clip") if not (models / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"--models {models} holds no {' or '.join(missing)}: give the "
                                "folder `train` wrote (its clip/ and llava/)")
    if args.oracle_readout_data:  # ORACLE: the labelled upper bound's readouts, never shipped
        _print_readouts(fit_oracle_readout(models / "llava", Path(args.work)))
        print("ORACLE readouts (pairs without the pair prior) -> "
              f"{models / 'llava' / ORACLE_READOUT_FOLDER}")
        return
    if args.readout_only:
        _print_readouts(fit_toy_readout(models / "llava", Path(args.work)))
    else:
        metrics = train_toy_spaces(models, Path(args.work))
        print(json.dumps({name: {k: m[k] for k in ("explained_variance", "dead_fraction",
                                                   "concept_agreement")}
                          for name, m in metrics.items()}, indent=2))
    # the recommended steering (mode grounding) reads its patch readouts beside the space
    _print_heldout(fit_toy_grounding(models / "llava", str(models / "llava")))


def _print_readouts(readouts: dict[str, dict]) -> None:
    """Each readout's fit metrics, without the config it was fitted under."""
    print(json.dumps({kind: {k: v for k, v in metrics.items() if k != "config"}
                      for kind, metrics in readouts.items()}, indent=2))


def _print_heldout(reports: dict[str, dict]) -> None:
    """Each grounding readout's held-out scores."""
    print(json.dumps({kind: report["heldout"] for kind, report in reports.items()}, indent=2))


def _grounding(args: argparse.Namespace) -> None:
    from sae_training.patch_readout import PatchReadoutConfig

    from .grounding import fit_toy_grounding

    reports = fit_toy_grounding(Path(args.out), args.model, n_train=args.n_train,
                                n_heldout=args.n_heldout, cfg=PatchReadoutConfig(steps=args.steps))
    _print_heldout(reports)


def _grounding_probe(args: argparse.Namespace) -> None:
    from sae_training.patch_readout import PatchReadoutConfig

    from ..reproduce.journal import atomic_write
    from .evaluate import write_json
    from .grounding_probe import probe_patch_features, probe_table

    if Path(args.json).suffix == ".md":
        raise ValueError(f"--json {args.json}: the table is written beside the result as .md, "
                         "which would overwrite it; give the result a .json name")

    result = probe_patch_features(args.model, n_train=args.n_train, n_heldout=args.n_heldout,
                                  cfg=PatchReadoutConfig(steps=args.steps))
    write_json(result, args.json)
    table = probe_table(result)
    atomic_write(Path(args.json).with_suffix(".md"), table)
    print(table)


def _settings(args: argparse.Namespace) -> EvalSettings:
    """The EvalSettings of an ``evaluate`` or ``compare`` command line."""
    from .evaluate import EvalSettings

    return EvalSettings(seed=args.seed, n_images=args.n_images, batch_size=args.batch_size,
                        model_path=args.model, decoding="sample" if args.sample else "greedy",
                        sample_seed=args.sample_seed)


def _evaluate(args: argparse.Namespace) -> None:
    from . import methods  # noqa: F401  (registers every toy-world method)
    from .evaluate import evaluate, format_score, write_json

    settings = _settings(args)
    answers = args.answers or Path(args.json).with_suffix(".answers.jsonl")
    with run_log(Path(args.json).with_suffix(".log")):
        result = evaluate(args.method, settings, answers=answers)
        write_json(result, args.json)
    pope, chair = result["pope"], result["chair"]
    print(f"{args.method} seed={args.seed} n={args.n_images} decoding={settings.decoding}"
          + (f" sample-seed={settings.sample_seed}" if settings.decoding == "sample" else ""))
    for split in pope:
        scores = pope[split]
        print(f"  POPE {split:<11} acc {scores['accuracy']:.3f}  f1 {scores['f1']:.3f}  "
              f"yes {scores['yes_ratio']:.3f}")
    b = chair["broken_pair"]
    print(f"  CHAIR_S {chair['chair_s']:.3f}  CHAIR_I {format_score(chair['chair_i'])}  "
          f"recall {chair['recall']:.3f}  len {chair['mean_len']:.1f}")
    print(f"  broken pairs: CHAIR_I {format_score(b['chair_i'])}  recall {b['recall']:.3f}  "
          f"partner named {b['partner_rate']:.3f}")
    print(f"  {result['seconds_per_token'] * 1000:.2f} ms/token  -> {args.json}")


def _export(args: argparse.Namespace) -> None:
    from .export import export_heldout, export_training_pairs

    if args.pairs:
        shards = export_training_pairs(Path(args.out), seed=args.seed, n_pairs=args.n_images)
        print(json.dumps({"shards": shards}, indent=2))
        return
    manifest = export_heldout(Path(args.out), seed=args.seed, n_images=args.n_images)
    print(json.dumps(manifest, indent=2))


def _compare(args: argparse.Namespace) -> None:
    from .compare import compare, compare_seeds

    seeds = [int(s) for s in args.seed.split(",")]
    settings = _settings(argparse.Namespace(**{**vars(args), "seed": seeds[0]}))
    methods = args.methods.split(",") if args.methods else None
    with run_log(Path(args.out) / "compare.log"):
        if len(seeds) == 1:
            compare(settings, args.out, methods)
        else:
            compare_seeds(settings, seeds, args.out, methods)
    print((Path(args.out) / "compare.md").read_text())


def _evidence(args: argparse.Namespace) -> None:
    from .evaluate import write_json
    from .evidence import EvidenceSettings, measure_evidence

    settings = EvidenceSettings(seed=args.seed, n_images=args.n_images, n_train=args.n_train,
                                model_path=args.model)
    result = measure_evidence(settings)
    write_json(result, args.json)
    rows = [*result["probes"].items(), ("model yes-no margin", result["model_yes_margin"]),
            *((f"concept space, {name}", s) for name, s in result.get("concept_space", {}).items()
              if name != "site")]
    for name, s in rows:
        print(f"  {name:<40} present vs absent partner {s['present_vs_absent_partner']:.3f}"
              f"  absent partner vs other absent {s['absent_partner_vs_other_absent']:.3f}"
              f"  present vs absent of a shown colour {s['present_vs_absent_same_colour']:.3f}")
    print(f"  best probe minus the model's own: {result['headroom']:+.3f}  -> {args.json}")


COMMANDS = {"train": _train, "train-spaces": _train_spaces, "grounding": _grounding,
            "grounding-probe": _grounding_probe, "evaluate": _evaluate, "export": _export,
            "compare": _compare, "evidence": _evidence}
"""Each command's name (``command_line.build_parser``) -> what it runs."""

RESUMES = {"train": "resume (each stage from its last save, every 50 steps)",
           "evaluate": "resume (from the answers written so far)",
           "compare": "resume (from each method's answers written so far)"}
"""What rerunning a command stopped by Ctrl-C does, for those that keep their work (the others
start over)."""


def main(argv: list[str] | None = None,
         prog: str = "python -m eval_suites.toyworld") -> None:
    parser = build_parser(prog, __doc__)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        COMMANDS[args.command](args)
    except (ValueError, OSError) as err:  # bad input (a method, a path, a resume refused)
        parser.exit(2, f"error: {err}\n")
    except KeyboardInterrupt:
        again = RESUMES.get(args.command, "start it over")
        parser.exit(130, f"interrupted; rerun the same command to {again}\n")


if __name__ == "__main__":
    main()
