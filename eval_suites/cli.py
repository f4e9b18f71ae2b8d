"""``vlsae``: one console script for every command of the three packages.

    vlsae convert --sae llava_256_8_best.pth --aux llava_aux_best.pt --out spaces/ref
    vlsae extract | train | readout | inspect ...   (learn a concept space: sae_training)
    vlsae patch-readout ...                         (mode grounding's readout, from boxes)
    vlsae pope | chair ...                          (the paper's protocols on a real model)
    vlsae compare | toy evaluate | toy ...          (the toy world: vlsae toy --help)
    vlsae lexvla ...                                (train / evaluate a LexVLA space)

Each command takes the same arguments as its ``python -m`` form, which stays as an alias.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module

COMMANDS: dict[str, tuple[str, str | None, str]] = {
    "convert": ("vlsae_hooks.__main__", "convert",
                "the reference's released .pth (+ aux .pt) to a space folder"),
    "extract": ("sae_training.cli", "extract", "hooked activations of image-caption pairs"),
    "train": ("sae_training.cli", "train", "the aligner + VL-SAE on extracted activations"),
    "readout": ("sae_training.cli", "readout", "a word / phrase readout beside a space"),
    "patch-readout": ("sae_training.cli", "patch-readout",
                      "mode grounding's patch readout beside a space, from COCO boxes"),
    "inspect": ("sae_training.cli", "inspect", "concept sheets of a trained space"),
    "pope": ("eval_suites.reproduce.__main__", "pope", "the paper's POPE protocol"),
    "chair": ("eval_suites.reproduce.__main__", "chair", "the paper's CHAIR protocol"),
    "compare": ("eval_suites.toyworld.__main__", "compare",
                "every method side by side on the toy world"),
    "toy": ("eval_suites.toyworld.__main__", None,
            "every toy-world command (train, evaluate, ...)"),
    "lexvla": ("sae_training.lexvla.__main__", None, "LexVLA training and evaluation"),
}
"""Command -> (module with ``main(argv)``, the subcommand it is there or None for all, help)."""


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items())
    return (f"usage: vlsae COMMAND [ARGS...]\n\ncommands:\n{rows}\n\n"
            "`vlsae COMMAND --help` for its arguments.")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] not in COMMANDS:
        sys.exit(f"vlsae: unknown command {argv[0]!r}\n\n{usage()}")
    module, subcommand, _ = COMMANDS[argv[0]]
    run: Callable[..., None] = import_module(module).main
    # usage lines name the command as typed: "vlsae compare", "vlsae toy evaluate"
    run(([subcommand] if subcommand else []) + argv[1:],
        prog="vlsae" if subcommand else f"vlsae {argv[0]}")


if __name__ == "__main__":
    main()
