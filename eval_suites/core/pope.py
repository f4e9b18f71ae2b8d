"""POPE's scoring: two readings of a free answer as yes / no, and the scores of the readings
against the ground truth. Whoever asks the questions (toy-world scenes, VCD-format files, an
lmms-eval task), the answers are read and scored here."""

from __future__ import annotations

import numpy as np


def parse_pope_answer(text: str) -> str:
    """POPE's own reading of a free answer: first sentence only, commas dropped; "no" if the
    words "No", "no" or "not" occur in it, otherwise "yes" (so an empty answer counts as yes)."""
    first = text.split(".")[0]
    words = first.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def parse_first_word(text: str) -> str:
    """A stricter reading than POPE's: "yes" only if the first word says so, else "no" (an empty
    or evasive answer is not taken for a yes)."""
    words = text.strip().lower().replace(".", " ").replace(",", " ").split()
    return "yes" if words and words[0] == "yes" else "no"


def pope_scores(answers: list[str], truths: list[str]) -> dict[str, float]:
    """accuracy, precision, recall, f1 ("yes" is positive), and yes_ratio = the MODEL's share of
    yes."""
    if len(answers) != len(truths):
        raise ValueError(f"{len(answers)} answers but {len(truths)} ground-truth labels")
    pred = np.array([a == "yes" for a in answers])
    gold = np.array([t == "yes" for t in truths])
    tp = float((pred & gold).sum())
    precision = tp / max(pred.sum(), 1)
    recall = tp / max(gold.sum(), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {
        "accuracy": float((pred == gold).mean()),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": float(pred.mean()),
        "n": len(answers),
    }
