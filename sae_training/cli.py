"""``python -m sae_training extract|train|readout|patch-readout|inspect``: every config field
is a flag.

Flags are generated from the dataclasses in ``config.py`` (help text = the field's docstring),
nested configs get a prefix (``--sae-k``, ``--aligner-epochs``) unless the field's metadata says
``flatten`` (``patch-readout``'s ``--steps``), so a default changed there is a default changed
here.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

from sae_training.config import ExtractConfig, ReadoutConfig, TrainConfig
from sae_training.grounding_config import PatchReadoutRunConfig


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (its documentation)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and \
                isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _nested_prefix(f, prefix: str) -> str:
    """The flag prefix of a nested config's fields: none where the field says ``flatten``."""
    return prefix if f.metadata.get("flatten") else f"{prefix}{f.name}_"


def _add_fields(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in fields(cls):
        kind = hints[f.name]
        if is_dataclass(kind):
            _add_fields(parser, kind, prefix=_nested_prefix(f, prefix))
            continue
        name = f"--{(prefix + f.name).replace('_', '-')}"
        dest = prefix + f.name
        required = f.default is MISSING and f.default_factory is MISSING
        default = None if required else f.default
        args = typing.get_args(kind)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), kind) if args else kind
        help_text = docs.get(f.name, "").replace("%", "%%")
        if base is bool:
            parser.add_argument(name, dest=dest, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        else:
            parser.add_argument(name, dest=dest, type=base, default=default, required=required,
                                metavar=base.__name__.upper(), help=help_text + (
                                    "" if required or optional and default is None
                                    else f" (default: {default})"))


def _build(cls: type, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values, prefix=_nested_prefix(f, prefix))
        else:
            kwargs[f.name] = values[prefix + f.name]
    return cls(**kwargs)


def parser(prog: str = "python -m sae_training") -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog=prog,
                                   description="Learn a VL-SAE concept space: extract "
                                   "activations, train, inspect.")
    sub = main.add_subparsers(dest="command", required=True)
    extract = sub.add_parser("extract", help="collect (vision, text) representations",
                             description=ExtractConfig.__doc__)
    _add_fields(extract, ExtractConfig)
    extract.add_argument("--skip-bad", action="store_true", help="keep going past damaged data "
                         "(cut, corrupt or empty tars): extract what can be read, mark those "
                         "shards unfinished (a later run retries them) and list what was lost "
                         "in OUT/skipped.jsonl; without it a damaged tar is an error")
    _add_remote_flag(extract)
    train = sub.add_parser("train", help="train the aligner (LLaVA) and the VL-SAE",
                           description=TrainConfig.__doc__)
    _add_fields(train, TrainConfig)
    readout = sub.add_parser("readout", help="fit a space's word readout (concepts -> caption "
                             "words) for evidence-mode steering", description=ReadoutConfig.__doc__)
    _add_fields(readout, ReadoutConfig)
    patches = sub.add_parser("patch-readout", help="fit mode grounding's patch readout (image "
                             "positions -> attribute and object words) from COCO-format boxes",
                             description=PatchReadoutRunConfig.__doc__)
    _add_fields(patches, PatchReadoutRunConfig)
    look = sub.add_parser("inspect", help="PNG sheets of concepts and training curves")
    look.add_argument("--run", required=True, help="a `train` output folder")
    look.add_argument("--data", help="extraction folder (default: the one the run trained on)")
    look.add_argument("--source", help="image-caption data to read images from (default: the "
                      "one recorded by extraction)")
    look.add_argument("--concepts", type=int, nargs="+", help="concept ids (default: the most "
                      "used ones)")
    look.add_argument("--n-concepts", type=positive_int, default=6, help="how many to show by "
                      "default")
    look.add_argument("--top", type=positive_int, default=5, help="images / captions per concept")
    look.add_argument("--max-samples", type=positive_int, default=20_000, help="pairs searched")
    look.add_argument("--out", help="output folder (default: RUN/inspect)")
    _add_remote_flag(look)
    return main


def positive_int(text: str) -> int:
    """argparse type of a count: 0 or fewer items, steps or concepts would run nothing, and
    fail deep in the work instead of here, naming the flag."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def count(text: str) -> int:
    """argparse type: how many things to draw or write, 0 for none (a negative count would
    slice from the end: all but the last few)."""
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (none) or more, got {value}")
    return value


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _add_remote_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-remote-data", action="store_true", help="read data given as a "
                        "`pipe:` shell command or a URL (http, https, s3, ...), also when a "
                        "manifest records it; refused by default")


def _config(cli: argparse.ArgumentParser, cls: type, args: dict) -> object:
    """``cls`` built from the flags; a value the config refuses (NaN, out of range) is a usage
    error (exit 2 with the reason), caught before any data is read."""
    try:
        return _build(cls, args)
    except ValueError as error:
        cli.error(str(error))


RESUMABLE = ("extract", "train", "patch-readout")
"""The commands that keep what they finished: rerun after Ctrl-C, they go on from there (the
others start over, leaving what an earlier run wrote as it was)."""


def main(argv: list[str] | None = None, prog: str = "python -m sae_training") -> None:
    """Run a subcommand (``prog``: the command's name in usage lines); Ctrl-C ends it with a
    hint instead of a traceback (exit status 130) that says whether the same command resumes
    (``RESUMABLE``) or starts over."""
    cli = parser(prog)
    args = vars(cli.parse_args(argv))
    command = args.pop("command")
    try:
        _dispatch(cli, command, args)
    except KeyboardInterrupt:
        again = "resume" if command in RESUMABLE else "start it over"
        print(f"interrupted; rerun the same command to {again}", file=sys.stderr)
        raise SystemExit(130) from None


def _dispatch(cli: argparse.ArgumentParser, command: str, args: dict) -> None:
    """Run the subcommand ``command`` with its parsed flags."""
    if command == "extract":
        from sae_training.extract import run_extract

        config = _config(cli, ExtractConfig, args)
        manifest = _or_exit(lambda: run_extract(config, skip_bad=args["skip_bad"],
                                                allow_remote=args["allow_remote_data"]))
        if manifest:
            print(json.dumps({k: v for k, v in manifest.items() if k != "shards"}, indent=2))
    elif command == "train":
        from sae_training.train import train

        config = _config(cli, TrainConfig, args)
        metrics = _or_exit(lambda: train(config))
        if metrics:
            print(json.dumps(metrics, indent=2))
    elif command == "readout":
        from sae_training.readout import train_readout

        config = _config(cli, ReadoutConfig, args)
        metrics = _or_exit(lambda: train_readout(config))
        print(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=2))
    elif command == "patch-readout":
        from sae_training.grounding_readout import fit_grounding_readout, summary

        config = _config(cli, PatchReadoutRunConfig, args)
        print(json.dumps(summary(_or_exit(lambda: fit_grounding_readout(config))), indent=2))
    else:
        _or_exit(lambda: _inspect(args))


class RefusedInput(SystemExit):
    """A refused input's exit: status 2, as a usage error and as every other command's refusal,
    with its message (already on stderr) as the exception's text."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _or_exit(run: typing.Callable[[], typing.Any]) -> typing.Any:
    """Bad input (data, paths, a setting the data or the model refuses, a run that cannot be
    resumed) ends the command with its message on stderr and exit status 2, not a traceback:
    every such error says what was wrong and what to do."""
    try:
        return run()
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise RefusedInput(f"error: {error}") from error


def _inspect(args: dict) -> None:
    from sae_training.inspection import concept_sheet, training_curves
    from sae_training.logs import setup_logging

    run = Path(args["run"])
    if not (run / "space" / "config.json").is_file():
        raise FileNotFoundError(f"--run {run} is not a `train` output folder (it has no "
                                "space/config.json): pass the --out folder of a finished train")
    out = Path(args["out"] or run / "inspect")
    setup_logging(out, "inspect")
    data = args["data"] or json.loads((run / "space" / "config.json").read_text())[
        "extra"]["training"]["data"]
    sheet = concept_sheet(run / "space", data, out / "concepts.png", args["concepts"],
                          args["n_concepts"], args["top"], args["source"], args["max_samples"],
                          args["allow_remote_data"])
    curves = training_curves(run, out / "curves.png")
    print(f"{sheet}\n{curves}")


if __name__ == "__main__":
    main(sys.argv[1:])
