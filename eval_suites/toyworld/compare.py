"""Every toy-world method on the same held-out scenes: ``compare.json``, a Markdown table and a
bar chart, so a change in any method shows up next to greedy and the peers in one run."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..reproduce.journal import atomic_write
from .evaluate import EvalSettings, HFDecoder, evaluate, load_model
from .language import EVAL_DESCRIBE_PROMPT
from .methods import load_all_methods
from .pope import SPLITS
from .world import heldout_scenes

METRICS: list[tuple[str, Callable[[dict], float | None]]] = [
    *[(f"POPE {split} {name}", lambda r, s=split, n=key: r["pope"][s][n])
      for split in SPLITS for name, key in (("accuracy", "accuracy"), ("F1", "f1"), ("yes ratio", "yes_ratio"))],
    ("CHAIR_S", lambda r: r["chair"]["chair_s"]),
    ("CHAIR_I", lambda r: r["chair"]["chair_i"]),
    ("CHAIR recall", lambda r: r["chair"]["recall"]),
    ("CHAIR object F1", lambda r: r["chair"]["f1"]),
    ("caption words", lambda r: r["chair"]["mean_len"]),
    ("broken pairs CHAIR_I", lambda r: r["chair"]["broken_pair"]["chair_i"]),
    ("broken pairs recall", lambda r: r["chair"]["broken_pair"]["recall"]),
    ("broken pairs object F1", lambda r: r["chair"]["broken_pair"]["f1"]),
    ("broken pairs partner named", lambda r: r["chair"]["broken_pair"]["partner_rate"]),
    ("ms per token", lambda r: r["seconds_per_token"] * 1000),
    ("time per token / greedy's", lambda r: r["ratio_to_greedy"]),
]
"""Rows of the Markdown table: label, value from one method's result."""

CHART_METRICS = (*(f"POPE {split} F1" for split in SPLITS), "CHAIR_S", "CHAIR_I", "CHAIR recall",
                 "broken pairs partner named")


def warm_up(model, processor, seed: int) -> None:
    """One short generation first, so one-time start-up costs do not land on the first method timed."""
    image = heldout_scenes(seed, 1)[0].image
    HFDecoder(model, processor, do_sample=False).generate([image], [EVAL_DESCRIBE_PROMPT], 2)


def compare(settings: EvalSettings, out: str | Path, methods: list[str] | None = None,
            model=None, processor=None) -> dict:
    """Evaluate ``methods`` (default: every registered one) on ``settings.seed``'s scenes and write
    ``out/compare.{json,md,png}``; returns the JSON content. Each method's answers are appended to
    ``out/<method>.answers.jsonl`` as they come, so a killed comparison resumes where it stopped."""
    available = load_all_methods()
    names = list(methods) if methods else list(available)
    unknown = [m for m in names if m not in available]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; available: {', '.join(available)}")
    if model is None:
        model, processor = load_model(settings.model_path)
    warm_up(model, processor, settings.seed)
    out = Path(out)
    results = {name: evaluate(name, settings, model, processor, out / f"{name}.answers.jsonl")
               for name in names}
    greedy = results["greedy"]["seconds_per_token"] if "greedy" in results else None
    for result in results.values():
        result["ratio_to_greedy"] = result["seconds_per_token"] / greedy if greedy else None
    summary = {"seed": settings.seed, "n_images": settings.n_images, "threads": torch.get_num_threads(),
               "decoding": settings.decoding, "sample_seed": settings.sample_seed,
               "methods": results}
    atomic_write(out / "compare.json", json.dumps(summary, indent=2))
    atomic_write(out / "compare.md", markdown_table(summary))
    bar_chart(summary, out / "compare.png")
    return summary


def decoding_label(summary: dict) -> str:
    """How every method decoded, for titles: greedy, or T = 1 sampling with its seed."""
    if summary["decoding"] == "sample":
        return f"T=1 sampling (seed {summary['sample_seed']})"
    return "greedy decoding"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_table(summary: dict) -> str:
    """Metrics as rows, methods as columns."""
    names = list(summary["methods"])
    lines = [f"Toy world, {decoding_label(summary)}, seed {summary['seed']}, "
             f"{summary['n_images']} held-out images, "
             f"{summary['threads']} CPU thread(s); time ratio > 1 means slower than greedy.", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, read in METRICS:
        lines.append(f"| {label} | " + " | ".join(_cell(read(summary["methods"][n])) for n in names) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(summary: dict, path: Path) -> None:
    """Grouped bars of the headline rates per method, and the time ratio to greedy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, reads = list(summary["methods"]), dict(METRICS)
    fig, (rates, cost) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [4, 1]})
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        result = summary["methods"][name]
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(CHART_METRICS))]
        rates.bar(xs, [reads[m](result) for m in CHART_METRICS], width, label=name)
        cost.bar(k, reads["time per token / greedy's"](result) or 0.0, 0.6, label=name)
    rates.set_xticks(range(len(CHART_METRICS)), CHART_METRICS, rotation=25, ha="right")
    rates.set_ylim(0, 1)
    rates.set_title(f"toy world, {decoding_label(summary)}, seed {summary['seed']}, "
                    f"{summary['n_images']} images")
    rates.legend()
    cost.set_xticks(range(len(names)), names, rotation=25, ha="right")
    cost.axhline(1.0, color="grey", linewidth=0.8)
    cost.set_title("time per token / greedy's")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, png.getvalue())
