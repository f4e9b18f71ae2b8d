"""Choose the ``lexvla`` strength on dev seed 1: greedy and ``lexvla`` at several strengths on the
same scenes (``compare``'s table and answer logs; a killed run resumes).

    python -m eval_suites.toyworld.lexvla_tune --strengths 1,2,4,8 --out runs/lexvla-tune-seed1

The held-out seeds (2, 3, 4) are for the chosen setting only; this never reads them.
"""

from __future__ import annotations

import argparse

from ..arguments import positive_int
from ..core.methods import register_method
from .lexvla_method import lexvla_method

DEV_SEED = 1


def register_strengths(strengths: list[float]) -> list[str]:
    """Register ``lexvla-s<strength>`` for each strength; returns the method names."""
    names = []
    for strength in strengths:
        name = f"lexvla-s{strength:g}"
        register_method(name, lexvla_method({"image_source": "own", "strength": strength}))
        names.append(name)
    return names


def strength_list(text: str) -> list[float]:
    """argparse type: comma-separated strengths, each a number >= 0 ("1,2,4,8")."""
    try:
        values = [float(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas such as "
                                         f"1,2,4,8, got {text!r}") from None
    if not all(0 <= v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"strengths are finite numbers >= 0, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval_suites.toyworld.lexvla_tune",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strengths", type=strength_list, default="1,2,4,8")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-images", type=positive_int, default=200)
    args = parser.parse_args(argv)
    names = register_strengths(args.strengths)
    from .__main__ import main as toyworld_main

    toyworld_main(["compare", "--seed", str(DEV_SEED), "--n-images", str(args.n_images),
                   "--out", args.out, "--methods", ",".join(["greedy", *names])])


if __name__ == "__main__":
    main()
