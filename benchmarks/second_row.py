"""What contrast's steered branch costs a decoding step in the model's own arithmetic: the linear
maps that run on its extra rows (every ``nn.Linear`` of the decoder layers from the steering
site on, and the head), timed on one row and on two, side by side, with the weights in cache
and out of it (a larger buffer written first, as a step finds them after the layers below).

    python benchmarks/second_row.py --json OUT.json                  # the shipped toy LLaVA
    python benchmarks/second_row.py --json OUT.json --repeats 2000 --flush-mib 64

On a GPU a second row is nearly free; on a CPU it is not: this is the part of contrast's cost
beyond shift's that lies in the model's own linear maps (``docs/benchmarks.md``). Writes
{"results": [{"cache", "one_row_us", "two_rows_us", "second_row_us"}], "details": {...}} (median
microseconds for all the linear maps of one step) and prints a Markdown table.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling modules
from decode_models import load_toy, toy_parser  # noqa: E402

from eval_suites.arguments import positive_int  # noqa: E402
from vlsae_hooks.adapters import adapter_for  # noqa: E402
from vlsae_hooks.modes.shift import ShiftOptions  # noqa: E402
from vlsae_hooks.site import resolve_site  # noqa: E402


def branch_linears(model: nn.Module, site: int) -> list[nn.Linear]:
    """The linear maps contrast's branch runs: those of decoder layers ``site`` on, the head."""
    adapter = adapter_for(model)
    layers = adapter.layers(model)[site:]
    linears = [m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)]
    return [*linears, adapter.head(model)]


def time_rows(linears: list[nn.Linear], repeats: int, flush: torch.Tensor | None) -> dict:
    """Median CPU microseconds of every map on one row and on two (one position each), the two
    alternated repeat by repeat; ``flush`` written before each timing when given."""
    inputs = {rows: [torch.randn(rows, 1, m.in_features) for m in linears] for rows in (1, 2)}
    times: dict[int, list[float]] = {1: [], 2: []}
    with torch.no_grad():
        for _ in range(repeats):
            for rows, xs in inputs.items():
                if flush is not None:
                    flush.add_(1)
                start = time.thread_time_ns()
                for linear, x in zip(linears, xs):
                    linear(x)
                times[rows].append((time.thread_time_ns() - start) / 1e3)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    return {"one_row_us": one, "two_rows_us": two, "second_row_us": two - one}


def markdown_table(results: list[dict]) -> str:
    lines = ["| weights | one row (us) | two rows (us) | the second row (us) |",
             "|---|---|---|---|"]
    lines += [f"| {r['cache']} | {r['one_row_us']:.0f} | {r['two_rows_us']:.0f} | "
              f"{r['second_row_us']:.0f} |" for r in results]
    return "\n".join(lines)


def main() -> None:
    parser = toy_parser(__doc__)
    parser.add_argument("--repeats", type=positive_int, default=1000)
    parser.add_argument("--flush-mib", type=int, default=64,
                        help="buffer written before each cold timing, larger than the caches")
    args = parser.parse_args()
    torch.set_num_threads(1)  # it times this thread's CPU time, which misses other threads' work
    torch.manual_seed(0)
    model, space, description = load_toy(args.toy_model)
    site = resolve_site(space, ShiftOptions(), len(adapter_for(model).layers(model)))
    linears = branch_linears(model, site)
    flush = torch.zeros(args.flush_mib * 2**20 // 4)
    results = [{"cache": cache, **time_rows(linears, args.repeats, buffer)}
               for cache, buffer in (("in cache", None), ("out of cache", flush))]
    details = {"model": description, "site_layer": site, "linear_maps": len(linears),
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "repeats": args.repeats, "flush_mib": args.flush_mib, "clock": "thread CPU time"}
    args.json.write_text(json.dumps({"results": results, "details": details}, indent=1))
    print(markdown_table(results))


if __name__ == "__main__":
    main()
