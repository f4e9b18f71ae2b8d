"""The product that every encode of a VL-SAE runs, a few rows times C^T, with C^T as the
transposed view of the stored concepts C [h, d] and as a contiguous copy, side by side; C out of
cache before each product (a larger buffer is written first), as a decoding step finds it.

    python benchmarks/concept_layout.py --json OUT.json            # the toy's and LLaVA's sizes
    python benchmarks/concept_layout.py --json OUT.json --sizes 2048x256 --rows 1 2 --repeats 500

``VLSAE.concepts_by_dimension`` keeps the contiguous copy for float32 concepts on a CPU and uses
the view otherwise; this script is how that choice was measured, and how to check it on another
CPU or BLAS. Writes {"results": [{"h", "d", "dtype", "rows", "view_us", "contiguous_us",
"contiguous_over_view"}], "details": {...}} (median microseconds per product) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def median_us(product, flush: torch.Tensor, repeats: int) -> float:
    """Median microseconds of ``product()``, each call after ``flush`` is written (so that the
    concepts come from memory, not cache)."""
    product()
    times = []
    for _ in range(repeats):
        flush.add_(1)
        start = time.perf_counter_ns()
        product()
        times.append((time.perf_counter_ns() - start) / 1e3)
    return statistics.median(times)


def measure(h: int, d: int, dtype: torch.dtype, rows: int, repeats: int,
            flush: torch.Tensor) -> dict:
    """One cell: random concepts [h, d] and ``rows`` inputs (seed 0), both layouts timed."""
    g = torch.Generator().manual_seed(0)
    concepts = torch.randn(h, d, generator=g).to(dtype)
    view, contiguous = concepts.T, concepts.T.contiguous()
    x = torch.randn(rows, d, generator=g).to(dtype)
    view_us = median_us(lambda: x @ view, flush, repeats)
    contiguous_us = median_us(lambda: x @ contiguous, flush, repeats)
    return {"h": h, "d": d, "dtype": str(dtype).removeprefix("torch."), "rows": rows,
            "view_us": view_us, "contiguous_us": contiguous_us,
            "contiguous_over_view": contiguous_us / view_us}


def markdown_table(results: list[dict]) -> str:
    """One row per cell: both layouts' medians and their ratio."""
    lines = ["| h x d | dtype | rows | view (us) | contiguous (us) | contiguous / view |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['h']} x {r['d']} | {r['dtype']} | {r['rows']} | {r['view_us']:.0f} | "
              f"{r['contiguous_us']:.0f} | {r['contiguous_over_view']:.2f}x |" for r in results]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--sizes", nargs="+", default=["2048x256", "32768x4096"],
                        help="h x d of the concepts (default: the toy's and LLaVA-1.5's)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                        default=["float32", "bfloat16"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 64],
                        help="rows multiplied at once (a step encodes one per sequence)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="products timed per cell (default: 200 below h*d = 2**24, else 5)")
    parser.add_argument("--flush-mib", type=int, default=64,
                        help="buffer written before each product, larger than the CPU's caches")
    args = parser.parse_args()
    if (args.repeats is not None and args.repeats < 1) or min(args.rows) < 1:
        parser.error("--repeats and every --rows must be at least 1")
    flush = torch.zeros(args.flush_mib * 2**20 // 4)
    results = []
    for size in args.sizes:
        try:
            h, d = (int(n) for n in size.lower().split("x"))
        except ValueError:
            parser.error(f"--sizes takes HxD such as 2048x256, got {size!r}")
        repeats = args.repeats if args.repeats is not None else 200 if h * d < 2**24 else 5
        for name in args.dtypes:
            for rows in args.rows:
                results.append(measure(h, d, DTYPES[name], rows, repeats, flush))
                print(markdown_table(results[-1:]).splitlines()[-1], flush=True)
    details = {"torch": torch.__version__, "threads": torch.get_num_threads(),
               "blas": "mkl" if torch.backends.mkl.is_available() else "other",
               "flush_mib": args.flush_mib}
    with open(args.json, "w") as f:
        json.dump({"results": results, "details": details}, f, indent=1)
    print(markdown_table(results))


if __name__ == "__main__":
    main()
