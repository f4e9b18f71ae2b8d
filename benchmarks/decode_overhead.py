"""End-to-end cost of every decoding method, relative to plain greedy, with the KV cache on; and
the same for two source trees side by side (a change's before and after, in one run).

Plain greedy, every vlsae steering method (``vlsae``: attach with no options, the space's
recommendation; ``-contrast``, ``-shift``, ``-reference``, ``-evidence`` with word and phrase
readouts, ``-cutoff``: contrast with contrast_weight = 0) and the peers (VCD, DoLa, VTI, VISTA) run
interleaved (same prompt, same machine state), each repeat in the order of ``METHODS``
(``decode_methods.py``; the models: ``decode_models.py``). One greedy generate per method and
repeat, timed step by step (a stopping criterion that only reads the clock), gives the seconds to
the first token (prefill + 1 token) and the median decode step after it. From these, per repeat,
the end-to-end ratio to plain of (a) a one-token answer and (b) a 512-token caption (first token +
511 decode steps); each reported ratio is the median over repeats of these paired ratios.
Extrapolating from a short decode keeps the 7B run short; for ``vlsae-reference`` (uncached: a
step recomputes the whole sequence) the caption ratio is a lower bound, its steps growing with
the caption.

    python benchmarks/decode_overhead.py --json OUT.json                  # toy + 7B geometry
    python benchmarks/decode_overhead.py --json OUT.json --skip-7b
    python benchmarks/decode_overhead.py --json OUT.json --n-layers 2 --vision-layers 1
    python benchmarks/decode_overhead.py --json OUT.json --baseline-src /tmp/before  # side by side
    python benchmarks/decode_overhead.py --json OUT.json --skip-7b --processes 5  # 5 rounds
    python benchmarks/decode_overhead.py --json OUT.json --device cuda    # on a GPU, wall clock

Writes {"toy": {method: {"one_token": r, "caption": r}}, "llava7b_geometry": {...},
"default": {geometry: {"method": "vlsae", "steering", "one_token", "caption", "limit": 1.1,
"meets_limit"}}, "details": {..., "tree": the checkout timed and its commit}} and prints a
Markdown table (``decode_report.py``). With ``--baseline-src DIR`` (another checkout, e.g. the
commit before a change) every geometry is timed in two worker processes, DIR's code and this
tree's (``--src``), interleaved repeat by repeat (``decode_timing.measure_side_by_side``):
each geometry then holds {"baseline": {method: ratios}, "current": {...}, "current_vs_baseline":
{method: {"one_token", "decode_step"}}}, "default" one verdict per tree, and "trees" both
checkouts. ``--processes N`` times N rounds one after another, each in a fresh forked worker
(per tree, side by side): each ratio is then the median over the rounds' own, with "range"
(lowest and highest) beside it, and every round's ratios under "details".
``--clock cpu`` times this thread's CPU time instead of the wall clock: on a shared machine other
processes disturb it far less (torch then runs on one thread, whose clock it is). ``--device
cuda`` builds both models on the GPU and times each step to the end of its kernels (wall clock;
one process, so neither side by side nor rounds: forked workers cannot share a CUDA context).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling modules
from decode_methods import METHODS, SETUPS  # noqa: E402
from decode_models import (  # noqa: E402
    default_toy_model,
    llava_7b_geometry,
    llava_7b_model,
    load_toy,
    prompt_inputs,
    toy_model,
    toy_parser,
    train_layer,
)
from decode_report import (  # noqa: E402
    DEFAULT_LIMIT,
    default_verdict,
    describe_tree,
    markdown_table,
)
from decode_timing import (  # noqa: E402
    CAPTION_TOKENS,
    CLOCKS,
    end_to_end,
    measure,
    measure_side_by_side,
    paired_ratios,
)

from eval_suites.arguments import positive_int  # noqa: E402

__all__ = ["CAPTION_TOKENS", "DEFAULT_LIMIT", "METHODS", "default_toy_model", "default_verdict",
           "end_to_end", "llava_7b_geometry", "load_toy", "markdown_table", "measure",
           "paired_ratios", "prompt_inputs"]

SIDE_BY_SIDE_METHODS = ("vlsae", "vlsae-contrast", "vlsae-shift", "vlsae-evidence")
"""What ``--baseline-src`` times unless ``--methods`` says otherwise: the default and the
three modes it is built from (the peers do not run vlsae_hooks)."""


def run_geometry(results: dict, key: str, model, space, new_tokens: int, repeats: int,
                 methods: tuple[str, ...], details: dict, clock: str = "wall") -> None:
    """Measure one model into ``results[key]`` (and its default verdict and details)."""
    measured = measure(model, space, prompt_inputs(model), new_tokens, repeats, methods, clock)
    results[key] = measured["ratios"]
    if "vlsae" in measured["ratios"]:
        results.setdefault("default", {})[key] = default_verdict(measured["ratios"], space)
    results["details"][key] = {**details, "new_tokens": new_tokens, "repeats": repeats,
                               "seconds": measured["seconds"]}


def run_side_by_side(results: dict, key: str, trees: dict[str, Path], model, make_space,
                     new_tokens: int, repeats: int, methods: tuple[str, ...], details: dict,
                     clock: str, processes: int = 1) -> None:
    """``run_geometry`` for every tree of ``trees`` at once, interleaved, ``processes`` rounds
    one after another. With one tree (``--processes`` alone) the results have
    ``run_geometry``'s layout, each ratio the median over the rounds, with its range."""
    measured = measure_side_by_side(trees, model, make_space, prompt_inputs(model), new_tokens,
                                    repeats, methods, clock, processes)
    if len(trees) == 1:
        (only,) = measured.values()
        results[key] = only["ratios"]
        if "vlsae" in only["ratios"]:
            results.setdefault("default", {})[key] = default_verdict(
                only["ratios"], only["ready"]["steering"])
        results["details"][key] = {
            **details, "new_tokens": new_tokens, "repeats": repeats, "processes": processes,
            "model": only["ready"]["ready"], "errors": only["errors"],
            "seconds": only["seconds"], "per_process": only.get("per_process")}
        return
    results[key] = {tree: measured[tree]["ratios"] for tree in trees}
    results[key]["current_vs_baseline"] = measured["current_vs_baseline"]
    for tree in trees:
        if "vlsae" in measured[tree]["ratios"]:
            results.setdefault("default", {}).setdefault(key, {})[tree] = default_verdict(
                measured[tree]["ratios"], measured[tree]["ready"]["steering"])
    results["details"][key] = {
        **details, "new_tokens": new_tokens, "repeats": repeats, "processes": processes,
        "model": {tree: measured[tree]["ready"]["ready"] for tree in trees},
        "vlsae_hooks": {tree: measured[tree]["ready"]["vlsae_hooks"] for tree in trees},
        "errors": {tree: measured[tree]["errors"] for tree in trees},
        "seconds": {tree: measured[tree]["seconds"] for tree in trees},
        "per_process": {tree: measured[tree].get("per_process") for tree in trees}}


def main() -> None:
    parser = toy_parser(__doc__)
    parser.add_argument("--skip-7b", action="store_true", help="only the toy model")
    parser.add_argument("--n-layers", type=int, default=32, help="decoder layers of the 7B shape")
    parser.add_argument("--vision-layers", type=int, default=24,
                        help="vision-tower layers of the 7B shape (prefill cost only)")
    parser.add_argument("--toy-tokens", type=int, default=32)
    parser.add_argument("--big-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--toy-repeats", type=positive_int, default=None,
                        help="repeats on the toy model (default: --repeats)")
    parser.add_argument("--methods", nargs="+", choices=list(SETUPS), default=None,
                        help="a subset to time (plain always runs; default: all, or side by "
                             f"side {' '.join(SIDE_BY_SIDE_METHODS)}); the diagnostics: "
                             "vlsae-shift-hooks and vlsae-contrast-hooks are the modes with a "
                             "zero realignment, vlsae-shift-hooks-read the same after reading "
                             "the concept matrix, the -small-space ones steer with 256 concepts, "
                             "the -compiled ones run the realignment torch.compile'd")
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="another checkout to time side by side with this one")
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the current tree, side by side (default: this script's checkout)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall")
    parser.add_argument("--processes", type=positive_int, default=1,
                        help="time this many rounds one after another, each in a fresh forked "
                             "worker (per tree, side by side); each ratio is then the median "
                             "over them, with its range: on a CPU a toy ratio moves by several "
                             "points from one process to the next")
    parser.add_argument("--device", default="cpu", help="cpu, or a GPU such as cuda or cuda:1")
    args = parser.parse_args()
    for flag in ("toy_tokens", "big_tokens"):
        if getattr(args, flag) < 2:
            parser.error(f"--{flag.replace('_', '-')} must be at least 2: a decode step is "
                         "timed after the first token")
    if args.device != "cpu":
        if args.clock == "cpu":
            parser.error("--clock cpu counts this thread's CPU time, not the GPU's work: use "
                         "the wall clock (the default) with --device " + args.device)
        if args.baseline_src is not None or args.processes > 1:
            parser.error("--baseline-src and --processes fork workers, and a forked process "
                         "cannot use the parent's CUDA context: use them on the CPU")
        torch.zeros(1, device=args.device)  # an unusable device fails here, before any work

    if args.clock == "cpu":  # this thread's clock misses torch's other threads' work
        torch.set_num_threads(1)
    side_by_side = args.baseline_src is not None
    forked = side_by_side or args.processes > 1  # timed in worker processes
    toy_repeats = args.repeats if args.toy_repeats is None else args.toy_repeats
    methods = tuple(args.methods or (SIDE_BY_SIDE_METHODS if side_by_side else METHODS))
    device = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
              else args.device)
    threads = 1 if forked else torch.get_num_threads()  # forked: the workers'
    results: dict = {"details": {"torch_threads": threads, "clock": args.clock,
                                 "torch": torch.__version__, "caption_tokens": CAPTION_TOKENS,
                                 "device": device}}
    trees = ({"baseline": args.baseline_src, "current": args.src} if side_by_side
             else {"current": args.src})
    if side_by_side:
        results["trees"] = {name: describe_tree(src) for name, src in trees.items()}
    else:  # the code timed: the workers' tree, or the vlsae_hooks this process imported
        import vlsae_hooks

        timed_tree = args.src if forked else Path(vlsae_hooks.__file__).resolve().parents[1]
        results["details"]["tree"] = describe_tree(timed_tree)
    with torch.no_grad():
        if forked:
            path = args.toy_model
            own = path == default_toy_model()  # then each tree reads its own toy assets' space
            run_side_by_side(results, "toy", trees, toy_model(path),
                             lambda models, model: models.toy_space(
                                 model, models.default_toy_model() if own else path),
                             args.toy_tokens, toy_repeats, methods, {}, args.clock,
                             args.processes)
        else:
            model, space, description = load_toy(args.toy_model, args.device)
            run_geometry(results, "toy", model, space, args.toy_tokens, toy_repeats, methods,
                         {"model": description}, args.clock)
            del model, space
        if not args.skip_7b:
            shape = {"n_layers": args.n_layers, "vision_layers": args.vision_layers,
                     "steered_layers": args.n_layers - 1 - train_layer(args.n_layers)}
            if forked:
                run_side_by_side(results, "llava7b_geometry", trees,
                                 llava_7b_model(args.n_layers, args.vision_layers),
                                 lambda models, model: (models.llava_7b_space(args.n_layers),
                                                    "LLaVA-1.5-7B geometry, random bf16"),
                                 args.big_tokens, args.repeats, methods, shape, args.clock,
                                 args.processes)
            else:
                model, space = llava_7b_geometry(args.n_layers, args.vision_layers, args.device)
                run_geometry(results, "llava7b_geometry", model, space, args.big_tokens,
                             args.repeats, methods, shape, args.clock)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown_table(results))


if __name__ == "__main__":
    main()
