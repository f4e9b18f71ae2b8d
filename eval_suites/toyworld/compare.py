"""Every toy-world method on the same held-out scenes: ``compare.json``, a Markdown table and a
bar chart, so a change in any method shows up next to greedy and the peers in one run."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from sae_training.store import atomic_write_png

from ..core.decoder import HFDecoder
from ..reproduce.journal import atomic_write
from .evaluate import EvalSettings, evaluate, format_score, load_model
from .language import EVAL_DESCRIBE_PROMPT
from .methods import toy_methods
from .pope import SPLITS
from .world import heldout_scenes

log = logging.getLogger(__name__)

METRICS: list[tuple[str, Callable[[dict], float | None], str | None]] = [
    *[(f"POPE {split} {name}", lambda r, s=split, n=key: r["pope"][s][n], better)
      for split in SPLITS for name, key, better in (("accuracy", "accuracy", "higher"),
                                                    ("F1", "f1", "higher"),
                                                    ("yes ratio", "yes_ratio", None))],
    ("CHAIR_S", lambda r: r["chair"]["chair_s"], "lower"),
    ("CHAIR_I", lambda r: r["chair"]["chair_i"], "lower"),
    ("CHAIR recall", lambda r: r["chair"]["recall"], "higher"),
    ("CHAIR object F1", lambda r: r["chair"]["f1"], "higher"),
    ("caption words", lambda r: r["chair"]["mean_len"], None),
    ("broken pairs CHAIR_I", lambda r: r["chair"]["broken_pair"]["chair_i"], "lower"),
    ("broken pairs recall", lambda r: r["chair"]["broken_pair"]["recall"], "higher"),
    ("broken pairs object F1", lambda r: r["chair"]["broken_pair"]["f1"], "higher"),
    ("broken pairs partner named", lambda r: r["chair"]["broken_pair"]["partner_rate"], "lower"),
    ("ms per token", lambda r: r["seconds_per_token"] * 1000, "lower"),
    ("time per token / greedy's", lambda r: r["ratio_to_greedy"], "lower"),
]
"""Rows of the tables: label, value from one method's result, which way is better (None: no
direction, e.g. the yes ratio, whose right value is the ground truth's)."""
ARROWS = {"higher": "↑", "lower": "↓", None: ""}

PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("POPE F1", tuple(f"POPE {split} F1" for split in SPLITS)),
    ("CHAIR errors", ("CHAIR_S", "CHAIR_I", "broken pairs CHAIR_I",
                      "broken pairs partner named")),
    ("CHAIR coverage", ("CHAIR recall", "CHAIR object F1", "broken pairs object F1")),
    ("cost", ("time per token / greedy's",)),
)
"""The chart's panels: metrics of one direction each, so every panel says which way is better."""


def warm_up(model, processor, seed: int) -> None:
    """One short generation first, so one-time start-up costs do not land on the first method
    timed."""
    image = heldout_scenes(seed, 1)[0].image
    HFDecoder(model, processor, do_sample=False).generate([image], [EVAL_DESCRIBE_PROMPT], 2)


def method_names(methods: list[str] | None) -> list[str]:
    """``methods`` (default: every registered one), each a registered method named once."""
    available = toy_methods()
    names = list(methods) if methods else list(available)
    unknown = [m for m in names if m not in available]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; available: {', '.join(available)}")
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        raise ValueError(f"methods {twice} named more than once; name each once")
    return names


def compare(settings: EvalSettings, out: str | Path, methods: list[str] | None = None,
            model=None, processor=None) -> dict:
    """Evaluate ``methods`` (default: every registered one) on ``settings.seed``'s scenes and write
    ``out/compare.{json,md,png}``; returns the JSON content. Each method's answers are appended to
    ``out/<method>.answers.jsonl`` as they come, so a killed comparison resumes where it stopped."""
    names = method_names(methods)
    if model is None:
        model, processor = load_model(settings.model_path)
    warm_up(model, processor, settings.seed)
    out = Path(out)
    log.info("comparing %s on seed %d into %s", ", ".join(names), settings.seed, out)
    results = {name: evaluate(name, settings, model, processor, out / f"{name}.answers.jsonl")
               for name in names}
    greedy = results["greedy"]["seconds_per_token"] if "greedy" in results else None
    for result in results.values():
        result["ratio_to_greedy"] = result["seconds_per_token"] / greedy if greedy else None
    summary = {"seed": settings.seed, "n_images": settings.n_images,
               "threads": torch.get_num_threads(),
               "decoding": settings.decoding, "sample_seed": settings.sample_seed,
               "methods": results}
    atomic_write(out / "compare.json", json.dumps(summary, indent=2))
    atomic_write(out / "compare.md", markdown_table(summary))
    bar_chart(summary, out / "compare.png")
    log.info("wrote %s", report_files(out))
    return summary


def report_files(out: Path) -> str:
    """The files a comparison writes into ``out``, for its log."""
    return ", ".join(str(out / f"compare.{ext}") for ext in ("json", "md", "png"))


def decoding_label(summary: dict) -> str:
    """How every method decoded, for titles: greedy, or T = 1 sampling with its seed."""
    if summary["decoding"] == "sample":
        return f"T=1 sampling (seed {summary['sample_seed']})"
    return "greedy decoding"


def markdown_table(summary: dict) -> str:
    """Metrics as rows (with which way is better), methods as columns."""
    names = list(summary["methods"])
    lines = [f"Toy world, {decoding_label(summary)}, seed {summary['seed']}, "
             f"{summary['n_images']} held-out images, "
             f"{summary['threads']} CPU thread(s); time ratio > 1 means slower than greedy.", "",
             "| metric | better | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for label, read, better in METRICS:
        cells = " | ".join(format_score(read(summary["methods"][n])) for n in names)
        lines.append(f"| {label} | {ARROWS[better]} | {cells} |")
    return "\n".join(lines) + "\n"


def spread(summaries: list[dict]) -> dict:
    """Per method and metric, the mean, min and max over the seeds' ``compare`` summaries (the
    same methods in each): what a table over several seeds reports."""
    names = list(summaries[0]["methods"])
    rows: dict[str, dict[str, dict]] = {}
    for name in names:
        rows[name] = {}
        for label, read, _ in METRICS:
            values = [read(s["methods"][name]) for s in summaries]
            if any(v is None for v in values):
                continue
            rows[name][label] = {"mean": sum(values) / len(values), "min": min(values),
                                 "max": max(values), "values": values}
    return {"seeds": [s["seed"] for s in summaries], "n_images": summaries[0]["n_images"],
            "decoding": summaries[0]["decoding"], "sample_seed": summaries[0]["sample_seed"],
            "methods": rows}


def spread_table(combined: dict) -> str:
    """Mean over the seeds, with the range in brackets."""
    names = list(combined["methods"])
    seeds = ", ".join(map(str, combined["seeds"]))
    lines = [f"Toy world, {decoding_label(combined)}, seeds {seeds}, {combined['n_images']} "
             "held-out images each: mean (min-max over the seeds).", "",
             "| metric | better | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for label, _, better in METRICS:
        cells = []
        for name in names:
            cell = combined["methods"][name].get(label)
            cells.append("-" if cell is None else
                         f"{cell['mean']:.3f} ({cell['min']:.3f}-{cell['max']:.3f})")
        lines.append(f"| {label} | {ARROWS[better]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(rows: dict[str, dict[str, dict]], title: str, path: Path) -> None:
    """One panel per group of metrics that share a direction (titled with it), methods as rows,
    a marker per metric at the mean with a bar over the seeds' range: readable with many
    methods, and the spread is in sight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    better = {label: direction for label, _, direction in METRICS}
    panels = [(group, labels) for group, labels in PANELS  # e.g. no cost without greedy's
              if any(label in rows[n] for label in labels for n in names)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 1.6 + 0.34 * len(names)),
                             sharey=True, squeeze=False)
    for ax, (group, labels) in zip(axes[0], panels):
        for j, label in enumerate(labels):
            offset = (j - (len(labels) - 1) / 2) * 0.18
            cells = [(i, rows[n][label]) for i, n in enumerate(names) if label in rows[n]]
            if not cells:
                continue
            ys = [len(names) - 1 - i + offset for i, _ in cells]
            means = [c["mean"] for _, c in cells]
            errors = [[c["mean"] - c["min"] for _, c in cells],
                      [c["max"] - c["mean"] for _, c in cells]]
            ax.errorbar(means, ys, xerr=errors, fmt="o", markersize=4, capsize=2, label=label)
        direction = better[labels[0]]
        ax.set_title(f"{group} ({direction} is better {ARROWS[direction]})", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=2)
        if group == "cost":
            ax.axvline(1.0, color="grey", linewidth=0.8)
    axes[0][0].set_yticks(range(len(names)), list(reversed(names)), fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    atomic_write_png(fig, path, dpi=110)
    plt.close(fig)


def bar_chart(summary: dict, path: Path) -> None:
    """``chart`` of one seed's summary (no spread to show)."""
    rows = {name: {label: {"mean": v, "min": v, "max": v} for label, read, _ in METRICS
                   if (v := read(result)) is not None}
            for name, result in summary["methods"].items()}
    chart(rows, f"toy world, {decoding_label(summary)}, seed {summary['seed']}, "
                f"{summary['n_images']} images", path)


def compare_seeds(settings: EvalSettings, seeds: list[int], out: str | Path,
                  methods: list[str] | None = None) -> dict:
    """``compare`` on each seed (into ``out/seed-<S>/``, each resumable), then the mean and range
    over the seeds in ``out/compare.{json,md,png}``: a table over several seeds, as the
    efficacy rules ask."""
    from dataclasses import replace

    out = Path(out)
    methods = method_names(methods)  # before the model loads
    model, processor = load_model(settings.model_path)
    summaries = [compare(replace(settings, seed=seed), out / f"seed-{seed}", methods, model,
                         processor) for seed in seeds]
    combined = spread(summaries)
    atomic_write(out / "compare.json", json.dumps(combined, indent=2))
    atomic_write(out / "compare.md", spread_table(combined))
    chart(combined["methods"], f"toy world, {decoding_label(combined)}, seeds "
          f"{', '.join(map(str, seeds))}, {combined['n_images']} images each (range over seeds)",
          out / "compare.png")
    log.info("wrote the spread over seeds %s: %s", ", ".join(map(str, seeds)), report_files(out))
    return combined
