"""Where a steered decoding step's extra time goes: inside the steering hooks (the mode's own
work: its state, its realignment, its logits) or outside them (the model's own operations,
which can run slower after the hooks' work, e.g. when the concept matrix read at every step
pushes part of the model's weights out of the CPU's caches).

Plain greedy and each method (``decode_methods.SETUPS``: the modes and their diagnostics) run
interleaved on the toy LLaVA, as ``decode_overhead.py`` runs them, on one thread, timed by this
thread's CPU clock step by step; every steerer's hooks (its ``_on_*`` methods) are wrapped with
the same clock while timed. Per method: the median decode step, its excess over plain's step of
the same repeat, the median time a step spends inside the hooks, and the rest of the excess
(outside = excess - inside). Medians over the steps of a generate, then over repeats.

    python benchmarks/hook_share.py --json OUT.json
    python benchmarks/hook_share.py --json OUT.json --methods vlsae-shift vlsae-shift-hooks

Writes {"methods": {method: {"step_us", "excess_us", "inside_us", "outside_us"}}, "details":
{...}} and prints a Markdown table. Only vlsae_hooks' steerers are wrapped: a peer's hooks count
as outside.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling modules
from decode_methods import SETUPS  # noqa: E402
from decode_models import load_toy, prompt_inputs, toy_parser  # noqa: E402
from decode_report import describe_tree  # noqa: E402
from decode_timing import step_times  # noqa: E402

from eval_suites.arguments import positive_int  # noqa: E402
from vlsae_hooks.modes.registry import Steerer  # noqa: E402

DEFAULT_METHODS = ("vlsae-shift", "vlsae-shift-hooks", "vlsae-contrast", "vlsae-contrast-hooks",
                   "vlsae-evidence")
"""The modes within the runtime's timing goals, and the shift and contrast diagnostics without
their realignment."""


def steerer_classes(root: type = Steerer) -> list[type]:
    """``root`` and every subclass of it, however deep."""
    return [root, *(cls for sub in root.__subclasses__() for cls in steerer_classes(sub))]


class HookClock:
    """The CPU time this thread spends inside any steerer's hooks (``_on_*`` methods), while
    entered: the classes' methods are wrapped, so only ``attach`` calls made inside count (a
    hook takes its method when registered). A hook running inside another (a subclass calling
    its parent's) counts once."""

    def __init__(self, clock=time.thread_time) -> None:
        self.clock, self.total, self._depth = clock, 0.0, 0
        self._wrapped: list[tuple[type, str, object]] = []

    def __enter__(self) -> HookClock:
        for cls in steerer_classes():
            for name, method in list(vars(cls).items()):
                if name.startswith("_on_") and callable(method):
                    self._wrapped.append((cls, name, method))
                    setattr(cls, name, self._timed(method))
        return self

    def __exit__(self, *exc_info) -> None:
        for cls, name, method in reversed(self._wrapped):
            setattr(cls, name, method)
        self._wrapped.clear()

    def _timed(self, method):
        @functools.wraps(method)
        def timed(*args, **kwargs):
            self._depth += 1
            start = self.clock() if self._depth == 1 else None
            try:
                return method(*args, **kwargs)
            finally:
                self._depth -= 1
                if start is not None:
                    self.total += self.clock() - start
        return timed

    def now(self) -> tuple[float, float]:
        """(the clock, the time spent inside hooks so far)."""
        return self.clock(), self.total


def step_seconds(model, inputs: dict, new_tokens: int, hooks: HookClock) -> tuple[float, float]:
    """(median decode step, median time inside hooks per decode step) of one greedy generate
    (the steps after the first token, timed as ``decode_timing.generate_seconds`` times them)."""
    if new_tokens < 3:
        raise ValueError(f"new_tokens must be >= 3 to time decode steps, got {new_tokens}")
    marks = step_times(model, inputs, new_tokens, hooks.now)
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks[1:], marks[2:])]
    return (statistics.median(step for step, _ in steps),
            statistics.median(inside for _, inside in steps))


def measure(model, space, inputs: dict, new_tokens: int, repeats: int,
            methods: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Plain and ``methods`` interleaved, ``repeats`` times: per method the medians over
    repeats, in microseconds (the excess paired with plain's step of the same repeat)."""
    names = ["plain", *(name for name in methods if name != "plain")]
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for warm_up in (True, *([False] * repeats)):
        for name in names:
            with HookClock() as hooks, SETUPS[name](model, space):
                measured = step_seconds(model, inputs, new_tokens, hooks)
            if not warm_up:
                runs[name].append(measured)
    results = {}
    for name in names:
        excess = statistics.median(step - plain for (step, _), (plain, _)
                                   in zip(runs[name], runs["plain"]))
        inside = statistics.median(inside for _, inside in runs[name])
        results[name] = {"step_us": 1e6 * statistics.median(step for step, _ in runs[name]),
                         "excess_us": 1e6 * excess, "inside_us": 1e6 * inside,
                         "outside_us": 1e6 * (excess - inside)}
    return results


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """One row per method: its decode step, the excess over plain's, inside and outside."""
    lines = ["| method | decode step | over plain | inside the hooks | outside them |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['step_us']:.0f} us | {r['excess_us']:.0f} us | "
                     f"{r['inside_us']:.0f} us | {r['outside_us']:.0f} us |")
    return "\n".join(lines)


def main() -> None:
    parser = toy_parser(__doc__)
    parser.add_argument("--methods", nargs="+", choices=sorted(set(SETUPS) - {"plain"}),
                        default=list(DEFAULT_METHODS))
    parser.add_argument("--tokens", type=positive_int, default=48,
                        help="new tokens per generate (at least 3)")
    parser.add_argument("--repeats", type=positive_int, default=15)
    args = parser.parse_args()
    if args.tokens < 3:
        parser.error(f"--tokens must be at least 3 to time decode steps, got {args.tokens}")
    torch.set_num_threads(1)  # this thread's clock misses torch's other threads' work
    model, space, description = load_toy(args.toy_model)
    with torch.no_grad():
        results = measure(model, space, prompt_inputs(model), args.tokens, args.repeats,
                          tuple(args.methods))
    details = {"model": description, "new_tokens": args.tokens, "repeats": args.repeats,
               "torch": torch.__version__, "torch_threads": 1, "clock": "thread CPU time",
               "tree": describe_tree(Path(__file__).resolve().parents[1])}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"methods": results, "details": details}, indent=1))
    print(markdown_table(results))


if __name__ == "__main__":
    main()
