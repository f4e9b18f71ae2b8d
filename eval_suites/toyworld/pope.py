"""POPE-style yes/no questions over toy-world scenes, in the three standard negative-sampling splits."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .language import EVAL_QUESTION
from .world import CLASS_NAMES, CLASSES, STREAM_TRAIN, WorldConfig, sample_scene, scene_rng

SPLITS = ("random", "popular", "adversarial")
QUESTIONS_PER_SIDE = 3


@lru_cache(maxsize=4)
def training_statistics(cfg: WorldConfig = WorldConfig(), n: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """(class frequency [C], co-occurrence counts [C, C]) over ``n`` training scenes (seed 0)."""
    freq = np.zeros(len(CLASSES))
    co = np.zeros((len(CLASSES), len(CLASSES)))
    for i in range(n):
        cls = list(sample_scene(scene_rng(0, STREAM_TRAIN, i), cfg).classes)
        freq[cls] += 1
        co[np.ix_(cls, cls)] += 1
    np.fill_diagonal(co, 0)
    return freq, co


def negatives(present: tuple[int, ...], split: str, n: int, rng: np.random.Generator,
              cfg: WorldConfig = WorldConfig()) -> list[int]:
    """``n`` absent classes chosen the way POPE chooses them for ``split``."""
    absent = [c for c in range(len(CLASSES)) if c not in present]
    freq, co = training_statistics(cfg)
    if split == "random":
        return [int(c) for c in rng.choice(absent, size=min(n, len(absent)), replace=False)]
    if split == "popular":
        score = freq[absent]
    elif split == "adversarial":  # the objects that co-occur most with what is in the image
        score = co[np.ix_(list(present), absent)].sum(0) * 1e6 + freq[absent]
    else:
        raise ValueError(f"unknown POPE split {split!r}; expected one of {SPLITS}")
    order = np.argsort(-score, kind="stable")
    return [absent[i] for i in order[:n]]


def pope_questions(scenes_classes: list[tuple[int, ...]], split: str, seed: int,
                   cfg: WorldConfig = WorldConfig()) -> list[dict]:
    """POPE rows for each image: up to 3 present objects ("yes") and as many absent ones ("no").

    Rows carry lmms-eval's POPE fields (``image`` is filled in by the exporter); ``image_index``
    points into ``scenes_classes`` and ``object`` is the class asked about.
    """
    rows = []
    for img, present in enumerate(scenes_classes):
        rng = np.random.default_rng([seed, SPLITS.index(split), img])
        pos = [int(c) for c in rng.choice(present, size=min(QUESTIONS_PER_SIDE, len(present)), replace=False)]
        neg = negatives(present, split, len(pos), rng, cfg)
        for cls, answer in [(c, "yes") for c in pos] + [(c, "no") for c in neg]:
            rows.append({
                "question_id": len(rows),
                "question": EVAL_QUESTION.format(obj=CLASS_NAMES[cls]),
                "answer": answer,
                "image_source": f"toyworld_{seed}_{img:05d}",
                "category": split,
                "image_index": img,
                "object": cls,
            })
    return rows


def parse_yes_no(text: str) -> str:
    """POPE's reading of a free answer: "yes" if the first word says so, else "no"."""
    words = text.strip().lower().replace(".", " ").replace(",", " ").split()
    return "yes" if words and words[0] == "yes" else "no"


def pope_scores(answers: list[str], truths: list[str]) -> dict[str, float]:
    """accuracy, precision, recall, f1 ("yes" is positive), and yes_ratio = the MODEL's share of yes."""
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
        "n": int(len(answers)),
    }
