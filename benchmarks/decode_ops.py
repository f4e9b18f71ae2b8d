"""What a decoding step launches, per method: aten operations and host reads of device values
per decode step, plain greedy's and each method's beyond it, counted (not timed) on one prompt.

Why count: on a GPU a toy-sized or batch-1 step is bound by kernel launches and by the host
waiting for the device, and these counts do not move with what else the machine runs, as
timings on a shared CPU do. Every aten operation is one launch on a GPU (an estimate: a fused
or a no-op view costs less); the operations that are not views (``kernels``) are about the
launches proper, and the same on torch 2.6 as on 2.14 (how many views an indexing expression
dispatches is not: torch 2.6 adds a slice to each ``x[:, None]``); a host read (``.item()``,
``bool(tensor)``, ``nonzero``) is a sync.
A step's count is the difference between greedy generates of ``--long`` and ``--short`` new
tokens, divided by the steps between them, so the prefill cancels out.

    python benchmarks/decode_ops.py --json OUT.json [--methods vlsae-shift ...] [--toy-model DIR]
    PYTHONPATH=../before python benchmarks/decode_ops.py --json OUT.json  # another checkout's
    # (one from 4fb9fc2 on: the counter is its vlsae_hooks.testing.DispatchCount)

Writes {"plain": {"operations", "kernels", "host_reads"}, "methods": {name: {"operations",
"kernels", "host_reads", "extra_operations", "extra_kernels", "extra_host_reads",
"launch_ratio"}}, "details": {...}}
(``launch_ratio``: the method's operations over plain's; plain's own host read is
``generate``'s check for finished sequences) and prints a Markdown table.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

import vlsae_hooks
from vlsae_hooks.testing import DispatchCount

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling modules
from decode_methods import SETUPS  # noqa: E402
from decode_models import load_toy, prompt_inputs, toy_parser  # noqa: E402

COUNTED = ("plain", "vlsae", "vlsae-contrast", "vlsae-shift", "vlsae-evidence", "vlsae-cutoff",
           "vlsae-grounding", "vcd", "dola", "vti", "vista")
"""Counted unless ``--methods`` says otherwise: every cached method (``vlsae-reference``
recomputes the whole sequence, so its step count grows with the caption)."""


def count_generate(model, inputs: dict, new_tokens: int) -> DispatchCount:
    """The operations of one greedy generate of exactly ``new_tokens``."""
    counter = DispatchCount()
    with counter, torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False)
    return counter


def per_step(model, space, setup, inputs: dict, short: int, long: int) -> dict[str, float]:
    """Operations and host reads per decode step of ``setup`` (a ``decode_methods`` setup)."""
    with setup(model, space):
        count_generate(model, inputs, short)  # warm: lazy set-up happens once, not in a count
        few, many = (count_generate(model, inputs, n) for n in (short, long))
    steps = long - short
    return {"operations": (many.operations - few.operations) / steps,
            "kernels": (many.kernels - few.kernels) / steps,
            "host_reads": (many.host_reads - few.host_reads) / steps}


def count_methods(model, space, inputs: dict, methods: Iterable[str], short: int = 2,
                  long: int = 10) -> dict:
    """Plain's counts per step, and each method's with its extra operations and launch ratio."""
    plain = per_step(model, space, SETUPS["plain"], inputs, short, long)
    counted = {}
    for name in methods:
        if name == "plain":
            continue
        counts = per_step(model, space, SETUPS[name], inputs, short, long)
        counted[name] = {**counts, "extra_operations": counts["operations"] - plain["operations"],
                         "extra_kernels": counts["kernels"] - plain["kernels"],
                         "extra_host_reads": counts["host_reads"] - plain["host_reads"],
                         "launch_ratio": counts["operations"] / plain["operations"]}
    return {"plain": plain, "methods": counted}


def markdown_table(results: dict) -> str:
    """One row per method: operations per step, beyond plain, their ratio; of them not views,
    beyond plain; host reads, beyond plain."""
    plain = results["plain"]
    lines = ["| per decode step | aten operations | beyond plain | operations / plain's "
             "| not views | beyond plain | host reads | beyond plain |",
             "|---|---|---|---|---|---|---|---|",
             f"| plain | {plain['operations']:.1f} | | | {plain['kernels']:.1f} | "
             f"| {plain['host_reads']:.2f} | |"]
    for name, counts in results["methods"].items():
        lines.append(f"| {name} | {counts['operations']:.1f} | {counts['extra_operations']:.1f} "
                     f"| {counts['launch_ratio']:.2f}x | {counts['kernels']:.1f} "
                     f"| {counts['extra_kernels']:.1f} | {counts['host_reads']:.2f} "
                     f"| {counts['extra_host_reads']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = toy_parser(__doc__)
    parser.add_argument("--methods", nargs="+", choices=list(SETUPS), default=list(COUNTED),
                        help="what to count (plain always is)")
    parser.add_argument("--short", type=int, default=2, help="new tokens of the short generate")
    parser.add_argument("--long", type=int, default=10, help="new tokens of the long generate")
    args = parser.parse_args()
    if args.short < 1:
        parser.error(f"--short must be at least 1 (a generate of no token), got {args.short}")
    if args.long <= args.short:
        parser.error(f"--long ({args.long}) must exceed --short ({args.short}): a step's count "
                     "is their difference")
    model, space, description = load_toy(args.toy_model)
    results = count_methods(model, space, prompt_inputs(model), args.methods, args.short,
                            args.long)
    results["details"] = {"model": description, "short": args.short, "long": args.long,
                          "vlsae_hooks": vlsae_hooks.__path__[0], "torch": torch.__version__}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown_table(results))


if __name__ == "__main__":
    main()
