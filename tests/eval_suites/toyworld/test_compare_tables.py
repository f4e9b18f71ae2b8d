"""The comparison's tables, spreads and charts, and what `compare` does with each method's
result, on made-up results (no model runs)."""

import json

import pytest
import torch

from eval_suites.toyworld.compare import (
    ARROWS,
    METRICS,
    compare,
    markdown_table,
    spread,
    spread_table,
)
from eval_suites.toyworld.evaluate import EvalSettings


def made_up_result(f1: float = 0.5, seconds: float = 0.01) -> dict:
    """One method's result, as ``evaluate`` returns it, with made-up numbers."""
    return {"pope": {s: {"accuracy": f1, "f1": f1, "yes_ratio": 0.5}
                     for s in ("random", "popular", "adversarial", "negated", "binding")},
            "chair": {"chair_s": 0.1, "chair_i": 0.2, "recall": 0.7, "f1": 0.7,
                      "mean_len": 9.0, "broken_pair": {"chair_i": 0.3, "recall": 0.6,
                                                       "f1": 0.6, "partner_rate": 0.4}},
            "seconds_per_token": seconds, "ratio_to_greedy": 1.0}


def test_spread_of_made_up_summaries():
    def summary(seed, f1):
        return {"seed": seed, "n_images": 5, "decoding": "greedy", "sample_seed": 55, "threads": 1,
                "methods": {"greedy": made_up_result(f1)}}

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


@pytest.fixture
def made_up_evaluate(monkeypatch):
    """``compare`` with ``evaluate`` answering made-up results (method i: F1 0.1 i, i + 1 times
    greedy's 10 ms per token) and no warm-up; the calls made, in order."""
    import eval_suites.toyworld.compare as module

    calls = []

    def evaluate(name, settings, model, processor, answers):
        calls.append({"method": name, "seed": settings.seed, "answers": answers,
                      "model": model, "processor": processor})
        i = len([c for c in calls if c.get("seed") == settings.seed]) - 1
        return made_up_result(0.1 * i, 0.01 * (i + 1))

    monkeypatch.setattr(module, "evaluate", evaluate)
    monkeypatch.setattr(module, "warm_up", lambda *args: calls.append({"warm_up": args}))
    monkeypatch.setattr(module, "load_model", lambda path: ("model", "processor"))
    return calls


def test_compare_runs_every_method_by_default_each_into_its_answers_file(made_up_evaluate,
                                                                         tmp_path):
    from eval_suites.toyworld.methods import toy_methods

    settings = EvalSettings(seed=5, n_images=3, batch_size=2, decoding="sample", sample_seed=9)
    summary = compare(settings, tmp_path, model="model", processor="processor")
    names = list(toy_methods())
    assert made_up_evaluate[0] == {"warm_up": ("model", "processor", 5)}
    assert [c["method"] for c in made_up_evaluate[1:]] == names == list(summary["methods"])
    for call in made_up_evaluate[1:]:  # appended as they come: a killed run resumes from them
        assert call["answers"] == tmp_path / f"{call['method']}.answers.jsonl"
        assert (call["seed"], call["model"], call["processor"]) == (5, "model", "processor")
    assert {k: v for k, v in summary.items() if k != "methods"} == {
        "seed": 5, "n_images": 3, "threads": torch.get_num_threads(), "decoding": "sample",
        "sample_seed": 9}
    ratios = [result["ratio_to_greedy"] for result in summary["methods"].values()]
    greedy = names.index("greedy")
    assert ratios == pytest.approx([(i + 1) / (greedy + 1) for i in range(len(names))])
    assert json.loads((tmp_path / "compare.json").read_text()) == summary
    assert (tmp_path / "compare.md").read_text() == markdown_table(summary)


def test_without_greedy_no_time_ratio_is_made_up(made_up_evaluate, tmp_path):
    summary = compare(EvalSettings(n_images=1), tmp_path, ["vcd", "dola"], "model", "processor")
    assert [r["ratio_to_greedy"] for r in summary["methods"].values()] == [None, None]
    assert "| time per token / greedy's | ↓ | - | - |" in (tmp_path / "compare.md").read_text()


def test_several_seeds_table_is_the_spread_of_each_seeds_comparison(made_up_evaluate, tmp_path):
    from eval_suites.toyworld.compare import compare_seeds

    combined = compare_seeds(EvalSettings(n_images=2), [4, 2], tmp_path, ["greedy", "vcd"])
    assert [c["seed"] for c in made_up_evaluate if "seed" in c] == [4, 4, 2, 2]
    assert [c["answers"] for c in made_up_evaluate if "seed" in c] == [
        tmp_path / f"seed-{s}" / f"{m}.answers.jsonl" for s in (4, 2) for m in ("greedy", "vcd")]
    per_seed = [json.loads((tmp_path / f"seed-{s}" / "compare.json").read_text()) for s in (4, 2)]
    assert [s["seed"] for s in per_seed] == [4, 2] and combined == spread(per_seed)
    assert json.loads((tmp_path / "compare.json").read_text()) == combined
    assert (tmp_path / "compare.md").read_text() == spread_table(combined)


def test_tables_are_well_formed_markdown_and_show_a_zero():
    result = made_up_result()
    result["chair"]["chair_i"] = 0.0  # captions that name no absent object
    summary = {"seed": 2, "n_images": 5, "decoding": "sample", "sample_seed": 7, "threads": 1,
               "methods": {"greedy": result, "vcd": made_up_result()}}
    combined = spread([summary, {**summary, "seed": 3}])
    assert combined["decoding"] == "sample" and combined["sample_seed"] == 7
    assert spread_table(combined).startswith("Toy world, T=1 sampling (seed 7), seeds 2, 3")
    for table in (markdown_table(summary), spread_table(combined)):
        rows = [line for line in table.splitlines() if line.startswith("|")]
        assert rows[1] == "|---|---|---|---|"
        assert {row.count("|") for row in rows} == {5}
    assert "| CHAIR_I | ↓ | 0.000 | 0.200 |" in markdown_table(summary)
    assert "| CHAIR_I | ↓ | 0.000 (0.000-0.000) | 0.200 (0.200-0.200) |" in spread_table(combined)


def charted(monkeypatch, draw) -> dict:
    """What ``draw()`` puts in its figure: per panel title, per metric (the legend's label),
    the (method, mean, min, max) of each marker, the method read off the y tick it sits on."""
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))
    draw()
    axes = figures[0].axes
    ticks = {round(y): t.get_text() for y, t in zip(axes[0].get_yticks(),
                                                    axes[0].get_yticklabels())}
    panels = {}
    for ax in axes:
        metrics = panels.setdefault(ax.get_title(), {})
        for container in ax.containers:
            marker, _, (bars,) = container.lines
            metrics[container.get_label()] = [
                (ticks[round(y)], x, seg[0][0], seg[1][0])
                for x, y, seg in zip(*marker.get_data(), bars.get_segments())]
        if any(list(line.get_xdata()) == [1, 1] for line in ax.lines):
            metrics["line at 1"] = True
    return panels


def test_chart_marks_each_method_on_its_own_row_with_its_range(monkeypatch, tmp_path):
    from eval_suites.toyworld.compare import PANELS, chart

    names = ["greedy", "vcd", "vlsae"]
    rows = {n: {label: {"mean": 0.5 + i / 10, "min": 0.4 + i / 10, "max": 0.7 + i / 10}
                for group, labels in PANELS for label in labels} for i, n in enumerate(names)}
    panels = charted(monkeypatch, lambda: chart(rows, "t", tmp_path / "c.png"))
    better = {label: direction for label, _, direction in METRICS}
    assert list(panels) == [f"{group} ({better[labels[0]]} is better {ARROWS[better[labels[0]]]})"
                            for group, labels in PANELS]
    for (group, labels), metrics in zip(PANELS, panels.values()):
        assert len({better[label] for label in labels}) == 1  # one direction a panel
        assert [m for m in metrics if m != "line at 1"] == list(labels)
        assert metrics.get("line at 1", False) == (group == "cost")  # greedy's time
        for label in labels:
            assert [m[0] for m in metrics[label]] == names
            assert [m[1:] for m in metrics[label]] == [pytest.approx(
                (rows[n][label]["mean"], rows[n][label]["min"], rows[n][label]["max"]))
                for n in names]
    assert [label for group, labels in PANELS for label in labels] == [
        *[f"POPE {s} F1" for s in ("random", "popular", "adversarial", "negated", "binding")],
        "CHAIR_S", "CHAIR_I", "broken pairs CHAIR_I", "broken pairs partner named",
        "CHAIR recall", "CHAIR object F1", "broken pairs object F1", "time per token / greedy's"]


def test_one_seeds_chart_shows_a_zero(monkeypatch, tmp_path):
    from eval_suites.toyworld.compare import bar_chart

    result = made_up_result()
    result["chair"]["chair_i"] = 0.0
    summary = {"seed": 2, "n_images": 5, "decoding": "greedy", "sample_seed": 55, "threads": 1,
               "methods": {"greedy": result}}
    panels = charted(monkeypatch, lambda: bar_chart(summary, tmp_path / "c.png"))
    assert panels["CHAIR errors (lower is better ↓)"]["CHAIR_I"] == [("greedy", 0.0, 0.0, 0.0)]
