"""The second-row benchmark times the linear maps of contrast's branch (the decoder layers from
the site on, and the head) on one row and on two, in cache and out of it, and writes them (a
smoke test: the timings are measured by running it, never asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers.benchmarks import load_benchmark
from torch import nn

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "second_row.py"


def test_the_branch_runs_the_linear_maps_of_the_upper_layers_and_the_head(tiny_llava_model):
    branch_linears = load_benchmark("second_row").branch_linears
    layers = tiny_llava_model.model.language_model.layers
    last = [m for m in layers[-1].modules() if isinstance(m, nn.Linear)]
    assert len(last) == 7  # q, k, v, o; gate, up, down
    assert branch_linears(tiny_llava_model, len(layers) - 1) == [*last, tiny_llava_model.lm_head]
    assert len(branch_linears(tiny_llava_model, 0)) == 7 * len(layers) + 1


def test_one_and_two_rows_are_timed_in_and_out_of_cache(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), "--repeats", "3",
                           "--flush-mib", "1"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    written = json.loads(out.read_text())
    assert [r["cache"] for r in written["results"]] == ["in cache", "out of cache"]
    for r in written["results"]:
        assert r["one_row_us"] > 0 and r["two_rows_us"] > 0
        assert r["second_row_us"] == r["two_rows_us"] - r["one_row_us"]
    # the shipped toy steers at its last decoder layer: its 7 maps and the head
    assert (written["details"]["site_layer"], written["details"]["linear_maps"]) == (3, 8)
    assert "| out of cache |" in done.stdout
