"""The decode-overhead benchmark runs every steering mode (a smoke test; its numbers are measured
by running it, never asserted here)."""

import importlib.util
from pathlib import Path

import torch

torch.set_num_threads(1)


def load_benchmark(name: str):
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_overhead_measures_every_mode_on_a_tiny_model():
    bench = load_benchmark("decode_overhead")
    model, space, description = bench.load_toy(None)
    with torch.no_grad():
        result = bench.measure(model, space, bench.prompt_inputs(model, n_text=6), new_tokens=3, repeats=1)
    assert "random tiny" in description
    assert set(bench.MODES) == {"contrast", "shift", "evidence"}
    for mode in bench.MODES:
        assert result[mode] > 0
        assert result["seconds"][mode]["decode_per_token"] > 0
