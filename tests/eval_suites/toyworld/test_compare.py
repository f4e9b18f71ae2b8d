"""``python -m eval_suites.toyworld compare``: every method on the same scenes, three outputs."""

import json

import pytest
import torch

from eval_suites.toyworld.__main__ import main
from eval_suites.toyworld.compare import (
    ARROWS,
    METRICS,
    compare,
    markdown_table,
    spread,
    spread_table,
)
from eval_suites.toyworld.evaluate import EvalSettings, evaluate


def test_compare_command_writes_json_table_and_chart(toy_llava, toy_llava_dir, tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "cmp"
    main(["compare", "--seed", "3", "--n-images", "2", "--batch-size", "8",
          "--model", str(toy_llava_dir),
          "--methods", "greedy,vcd,dola", "--out", str(out)])
    summary = json.loads((out / "compare.json").read_text())
    assert list(summary["methods"]) == ["greedy", "vcd", "dola"]
    for name, result in summary["methods"].items():
        assert result["method"] == name and result["n_images"] == 2
        assert set(result["pope"]) == {"random", "popular", "adversarial", "negated", "binding"}
        assert result["decoding"] == "greedy" and result["sample_seed"] == 55
        assert {"chair_s", "chair_i", "recall", "mean_len", "broken_pair"} <= set(result["chair"])
        assert result["seconds_per_token"] > 0 and result["ratio_to_greedy"] > 0
    assert summary["methods"]["greedy"]["ratio_to_greedy"] == 1.0

    table = (out / "compare.md").read_text()
    assert "| metric | better | greedy | vcd | dola |" in table
    for label, _, better in METRICS:
        assert f"| {label} | {ARROWS[better]} |" in table
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| metric |" in capsys.readouterr().out

    # the same numbers as evaluating greedy on its own (greedy decoding is deterministic)
    model, processor = toy_llava
    alone = evaluate("greedy", EvalSettings(seed=3, n_images=2, batch_size=8), model, processor)
    assert alone["pope"] == summary["methods"]["greedy"]["pope"]
    assert alone["chair"] == summary["methods"]["greedy"]["chair"]


def test_compare_rejects_unknown_methods(tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        compare(EvalSettings(n_images=1), tmp_path, ["greedy", "nope"], model=object(),
                processor=object())


def test_several_seeds_report_mean_and_range(toy_llava_dir, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "cmp"
    main(["compare", "--seed", "3,4", "--n-images", "2", "--batch-size", "8", "--model",
          str(toy_llava_dir), "--methods", "greedy,sample", "--out", str(out)])
    combined = json.loads((out / "compare.json").read_text())
    per_seed = [json.loads((out / f"seed-{s}" / "compare.json").read_text()) for s in (3, 4)]
    assert combined["seeds"] == [3, 4]
    for name in ("greedy", "sample"):
        cell = combined["methods"][name]["POPE adversarial F1"]
        values = [s["methods"][name]["pope"]["adversarial"]["f1"] for s in per_seed]
        assert cell["values"] == values and cell["mean"] == sum(values) / 2
        assert (cell["min"], cell["max"]) == (min(values), max(values))
    assert "mean (min-max over the seeds)" in (out / "compare.md").read_text()
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spread_of_made_up_summaries():
    def summary(seed, f1):
        result = {"pope": {s: {"accuracy": f1, "f1": f1, "yes_ratio": 0.5}
                           for s in ("random", "popular", "adversarial", "negated", "binding")},
                  "chair": {"chair_s": 0.1, "chair_i": 0.2, "recall": 0.7, "f1": 0.7,
                            "mean_len": 9.0, "broken_pair": {"chair_i": 0.3, "recall": 0.6,
                                                             "f1": 0.6, "partner_rate": 0.4}},
                  "seconds_per_token": 0.01, "ratio_to_greedy": 1.0}
        return {"seed": seed, "n_images": 5, "decoding": "greedy", "sample_seed": 55, "threads": 1,
                "methods": {"greedy": result}}

    seeds = [summary(2, 0.6), summary(3, 0.9), summary(4, 0.75)]
    seeds[1]["methods"]["greedy"]["chair"]["chair_i"] = None  # a seed whose captions name nothing
    combined = spread(seeds)
    cell = combined["methods"]["greedy"]["POPE binding F1"]
    assert (cell["min"], cell["max"]) == (0.6, 0.9) and abs(cell["mean"] - 0.75) < 1e-12
    table = spread_table(combined)
    assert "| POPE binding F1 | ↑ | 0.750 (0.600-0.900) |" in table
    assert "| CHAIR_I | ↓ | - |" in table and "| broken pairs CHAIR_I | ↓ | 0.300 (0.300-0.300) |" \
        in table
    assert "| CHAIR_I | ↓ | - |" in markdown_table(seeds[1])
    assert "| CHAIR_I | ↓ | 0.200 |" in markdown_table(seeds[0])


def test_chart_leaves_out_a_panel_with_nothing_to_show(tmp_path):
    from eval_suites.toyworld.compare import PANELS, chart

    cell = {"mean": 0.5, "min": 0.4, "max": 0.6}
    rows = {"sample": {"CHAIR_I": cell, "POPE random F1": cell}}  # no cost: sampled, no greedy
    chart(rows, "t", tmp_path / "two.png")
    rows["sample"]["time per token / greedy's"] = cell
    chart(rows, "t", tmp_path / "three.png")

    def width(path):  # a PNG's IHDR width; the figure is 4.2 inches at 110 dpi per panel
        return int.from_bytes(path.read_bytes()[16:20], "big")

    assert len(PANELS) == 4
    assert (width(tmp_path / "two.png"), width(tmp_path / "three.png")) == (924, 1386)


def test_every_table_row_reads_its_own_number():
    """A result whose every number differs: each row must show the one its label names."""
    from eval_suites.toyworld.compare import METRICS
    from eval_suites.toyworld.pope import SPLITS

    keys = {"accuracy": "accuracy", "F1": "f1", "yes ratio": "yes_ratio"}
    pope = {s: {k: 0.1 * i + 0.01 * j for j, k in enumerate(keys.values())}
            for i, s in enumerate(SPLITS)}
    chair = {"chair_s": 1.1, "chair_i": 1.2, "recall": 1.3, "f1": 1.4, "mean_len": 1.5,
             "broken_pair": {"chair_i": 2.1, "recall": 2.2, "f1": 2.3, "partner_rate": 2.4}}
    result = {"pope": pope, "chair": chair, "seconds_per_token": 0.003, "ratio_to_greedy": 3.1}
    expected = {**{f"POPE {s} {name}": pope[s][key] for s in SPLITS for name, key in keys.items()},
                "CHAIR_S": 1.1, "CHAIR_I": 1.2, "CHAIR recall": 1.3, "CHAIR object F1": 1.4,
                "caption words": 1.5, "broken pairs CHAIR_I": 2.1, "broken pairs recall": 2.2,
                "broken pairs object F1": 2.3, "broken pairs partner named": 2.4,
                "ms per token": 3.0, "time per token / greedy's": 3.1}
    assert {label: value(result) for label, value, _ in METRICS} == pytest.approx(expected)
    assert {label: better for label, _, better in METRICS if better == "lower"} == {
        label: "lower" for label in ("CHAIR_S", "CHAIR_I", "broken pairs CHAIR_I",
                                     "broken pairs partner named", "ms per token",
                                     "time per token / greedy's")}
