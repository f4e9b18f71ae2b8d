"""Captions, prompts and yes/no questions of the toy world, and the closed word list they use."""

from __future__ import annotations

import numpy as np

from .world import CLASSES, COLOURS, SHAPE_SYNONYMS, Scene

CAPTION_TEMPLATES: tuple[str, ...] = (
    "there is {objs} .",
    "the image shows {objs} .",
    "i can see {objs} .",
    "{objs} on a dark background .",
)
DESCRIBE_PROMPTS: tuple[str, ...] = (
    "describe the image .",
    "what is in the image ?",
    "list the objects in the image .",
)
QUESTION_TEMPLATES: tuple[str, ...] = (
    "is there a {obj} in the image ?",
    "does the image contain a {obj} ?",
    "can you see a {obj} ?",
)
# The evaluation prompts (POPE's own question form and a LLaVA-style description request).
EVAL_DESCRIBE_PROMPT = "Describe the image."
EVAL_QUESTION = "Is there a {obj} in the image?"
SYNONYM_PROB = 0.15


def join_objects(phrases: list[str]) -> str:
    """'a red star , a blue ring and a green cross'"""
    items = [f"a {p}" for p in phrases]
    if len(items) == 1:
        return items[0]
    return " , ".join(items[:-1]) + " and " + items[-1]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming every object once, in fixed class order, in a random template."""
    phrases = []
    for c in scene.classes:
        colour, shape = CLASSES[c]
        words = SHAPE_SYNONYMS[shape]
        word = (words[1 + int(rng.integers(len(words) - 1))]
                if len(words) > 1 and rng.random() < SYNONYM_PROB else words[0])
        phrases.append(f"{colour} {word}")
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    return template.format(objs=join_objects(phrases))


def vocabulary() -> list[str]:
    """Every word the world's texts can contain, in a fixed order (the tokenizer's word list)."""
    words: list[str] = ["user", "assistant", ":", "yes", "no", "a"]
    words += list(COLOURS)
    for syns in SHAPE_SYNONYMS.values():
        words += list(syns)
    texts = CAPTION_TEMPLATES + DESCRIBE_PROMPTS + QUESTION_TEMPLATES + (" and , ",)
    for t in texts:
        for w in t.replace("{objs}", " ").replace("{obj}", " ").split():
            if w not in words:
                words.append(w)
    return words
