"""POPE-style yes/no questions over toy-world scenes: the three standard negative-sampling splits,
and two that a bias toward "yes" on asked words cannot pass: ``negated`` ("Is there no X...?",
truth flipped) and ``binding`` (absent objects made of the shown colours and shapes)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .language import EVAL_QUESTION
from .world import CLASS_NAMES, CLASSES, STREAM_TRAIN, WorldConfig, sample_scene, scene_rng

SPLITS = ("random", "popular", "adversarial", "negated", "binding")
QUESTIONS_PER_SIDE = 3
NEGATED_QUESTION = "Is there no {obj} in the image?"
"""``EVAL_QUESTION`` (the trained wording) with "a" negated: yes means the object is absent."""


@lru_cache(maxsize=4)
def training_statistics(cfg: WorldConfig = WorldConfig(),
                        n: int = 20000) -> tuple[np.ndarray, np.ndarray]:
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
    """``n`` absent classes chosen the way POPE chooses them for ``split`` (``negated`` as
    ``adversarial``, so the pair prior is tested; ``binding`` may return fewer than ``n``)."""
    absent = [c for c in range(len(CLASSES)) if c not in present]
    freq, co = training_statistics(cfg)
    if split == "random":
        return [int(c) for c in rng.choice(absent, size=min(n, len(absent)), replace=False)]
    if split == "binding":  # absent objects of a shown colour or shape; both shown ones first
        colours, shapes = {CLASSES[c][0] for c in present}, {CLASSES[c][1] for c in present}
        shared = {c: (CLASSES[c][0] in colours) + (CLASSES[c][1] in shapes) for c in absent}
        lures = [int(c) for c in rng.permutation(absent) if shared[int(c)]]
        return sorted(lures, key=lambda c: -shared[c])[:n]
    if split == "popular":
        score = freq[absent]
    elif split in ("adversarial", "negated"):  # what co-occurs most with what is in the image
        score = co[np.ix_(list(present), absent)].sum(0) * 1e6 + freq[absent]
    else:
        raise ValueError(f"unknown POPE split {split!r}; expected one of {SPLITS}")
    order = np.argsort(-score, kind="stable")
    return [absent[i] for i in order[:n]]


def pope_questions(scenes_classes: list[tuple[int, ...]], split: str, seed: int,
                   cfg: WorldConfig = WorldConfig()) -> list[dict]:
    """POPE rows for each image: up to 3 present objects ("yes") and as many absent ones ("no");
    under ``negated`` the question says "no X" and the answers flip.

    Rows carry lmms-eval's POPE fields (``image`` is filled in by the exporter); ``image_index``
    points into ``scenes_classes`` and ``object`` is the class asked about.
    """
    rows = []
    negated = split == "negated"
    question = NEGATED_QUESTION if negated else EVAL_QUESTION
    for img, present in enumerate(scenes_classes):
        rng = np.random.default_rng([seed, SPLITS.index(split), img])
        size = min(QUESTIONS_PER_SIDE, len(present))
        pos = [int(c) for c in rng.choice(present, size=size, replace=False)]
        neg = negatives(present, split, len(pos), rng, cfg)
        pos = pos[:len(neg)]  # binding may find fewer lures: stay balanced per image
        for cls, shown in [(c, True) for c in pos] + [(c, False) for c in neg]:
            rows.append({
                "question_id": len(rows),
                "question": question.format(obj=CLASS_NAMES[cls]),
                "answer": "yes" if shown != negated else "no",
                "image_source": f"toyworld_{seed}_{img:05d}",
                "category": split,
                "image_index": img,
                "object": cls,
            })
    return rows
