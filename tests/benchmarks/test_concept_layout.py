"""The concept-layout benchmark times both layouts of C^T for every size, dtype and row count it
is given and writes them (a smoke test: the timings are measured by running it, never asserted),
and refuses a malformed size with a message that shows the form."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "concept_layout.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_both_layouts_are_timed_for_every_cell(tmp_path):
    out = tmp_path / "layout.json"
    done = run("--json", str(out), "--sizes", "64x8", "96x16", "--rows", "1", "3",
               "--repeats", "3", "--flush-mib", "1")
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())["results"]
    cells = {(r["h"], r["d"], r["dtype"], r["rows"]) for r in results}
    assert cells == {(h, d, dtype, rows) for h, d in ((64, 8), (96, 16))
                     for dtype in ("float32", "bfloat16") for rows in (1, 3)}
    for r in results:
        assert r["view_us"] > 0 and r["contiguous_us"] > 0
        assert r["contiguous_over_view"] == r["contiguous_us"] / r["view_us"]
    assert "| 96 x 16 | bfloat16 | 3 |" in done.stdout


def test_a_malformed_size_says_the_form(tmp_path):
    done = run("--json", str(tmp_path / "x.json"), "--sizes", "2048-256")
    assert done.returncode == 2
    assert "--sizes takes HxD such as 2048x256, got '2048-256'" in done.stderr


def test_a_count_below_one_is_refused(tmp_path):
    for flags in (["--repeats", "0"], ["--rows", "1", "0"]):
        done = run("--json", str(tmp_path / "x.json"), *flags)
        assert done.returncode == 2
        assert "--repeats and every --rows must be at least 1" in done.stderr
