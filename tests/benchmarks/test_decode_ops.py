"""The operation-count benchmark counts a decode step's operations and host reads exactly:
a hook that adds four operations and one read a forward shows as four and one per step."""

import contextlib

import torch
from helpers.benchmarks import load_benchmark

torch.set_num_threads(1)


def test_counts_per_decode_step_beyond_plain():
    bench = load_benchmark("decode_ops")
    model, space, _ = bench.load_toy(None)
    inputs = bench.prompt_inputs(model, n_text=6)
    results = bench.count_methods(model, space, inputs, ["plain", "vlsae-evidence", "vlsae-shift"])
    plain = results["plain"]
    assert plain["operations"] > 50 and plain["operations"] == int(plain["operations"])
    assert plain["host_reads"] == 1  # generate's own check for finished sequences
    assert set(results["methods"]) == {"vlsae-evidence", "vlsae-shift"}
    evidence, shift = results["methods"]["vlsae-evidence"], results["methods"]["vlsae-shift"]
    assert evidence["extra_host_reads"] == 0  # its moves are read at prefill, never per step
    assert shift["extra_host_reads"] == 1  # the running text sums' finiteness, once a step
    for counts in (evidence, shift):
        assert counts["extra_operations"] > 0
        assert counts["launch_ratio"] == counts["operations"] / plain["operations"]
    table = bench.markdown_table(results)
    assert "| vlsae-shift |" in table and f"{plain['operations']:.1f}" in table


def test_a_sync_in_a_step_is_counted_once_per_step():
    bench = load_benchmark("decode_ops")
    model, space, _ = bench.load_toy(None)
    inputs = bench.prompt_inputs(model, n_text=6)
    plain = bench.per_step(model, space, bench.SETUPS["plain"], inputs, 2, 6)

    @contextlib.contextmanager
    def reading(model, space):  # a forward hook that reads a value back at every forward
        def read(module, args, out) -> None:
            bool(out[0].sum() > 0)

        hook = model.model.language_model.layers[0].register_forward_hook(read)
        yield
        hook.remove()

    read = bench.per_step(model, space, reading, inputs, 2, 6)
    assert read["host_reads"] == plain["host_reads"] + 1
    assert read["operations"] == plain["operations"] + 4  # out[0], sum, gt, the read

