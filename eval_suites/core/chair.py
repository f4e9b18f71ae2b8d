"""CHAIR (Rohrbach et al., 2018): how many of the objects a caption names are not in the image.

Our own scorer, with no NLTK data to download: words are singularised by lemminflect (its data
ships in the wheel) and matched against each object's synonym phrases, longest phrase first.
Works for the toy world and for COCO synonym lists a user brings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache

from lemminflect import getLemma

_WORD = re.compile(r"[a-z]+")


@lru_cache(maxsize=65536)
def singular(word: str) -> str:
    """'forks' -> 'fork'; words lemminflect does not know as nouns are kept."""
    lemmas = getLemma(word, upos="NOUN")
    return lemmas[0] if lemmas else word


def _tokens(text: str) -> list[str]:
    return [singular(w) for w in _WORD.findall(text.lower())]


class ChairScorer:
    """Finds object mentions in captions and scores them against per-image ground truth."""

    def __init__(self, synonyms: Mapping[str, Sequence[str]]):
        """``synonyms``: object name -> phrases that name it (the name itself is always one)."""
        self._phrases: dict[tuple[str, ...], str] = {}
        for obj, phrases in synonyms.items():
            for phrase in (obj, *phrases):
                key = tuple(_tokens(phrase))
                if not key:
                    raise ValueError(f"synonym {phrase!r} of {obj!r} has no words")
                owner = self._phrases.setdefault(key, obj)
                if owner != obj:
                    raise ValueError(f"phrase {phrase!r} names both {owner!r} and {obj!r}")
        self._longest = max(len(k) for k in self._phrases)

    def mentions(self, caption: str) -> list[str]:
        """Objects named in ``caption``, each once, in order of first mention."""
        words = _tokens(caption)
        found: list[str] = []
        i = 0
        while i < len(words):
            for n in range(min(self._longest, len(words) - i), 0, -1):
                obj = self._phrases.get(tuple(words[i : i + n]))
                if obj is not None:
                    if obj not in found:
                        found.append(obj)
                    i += n
                    break
            else:
                i += 1
        return found

    def score(self, captions: Sequence[str], truths: Sequence[set[str]]) -> dict[str, float]:
        """CHAIR_S (captions with any hallucination), CHAIR_I (hallucinated / named objects),
        recall (ground-truth objects named / ground-truth objects), object F1 (the harmonic mean
        of 1 - CHAIR_I and recall: a method that names less lowers CHAIR_I, not this) and mean
        caption length in words."""
        if len(captions) != len(truths):
            raise ValueError(f"{len(captions)} captions but {len(truths)} ground-truth sets")
        named = hallucinated = covered = gold = bad_captions = words = 0
        for caption, truth in zip(captions, truths):
            found = set(self.mentions(caption))
            wrong = found - truth
            named += len(found)
            hallucinated += len(wrong)
            covered += len(found & truth)
            gold += len(truth)
            bad_captions += bool(wrong)
            words += len(_WORD.findall(caption.lower()))
        n = max(len(captions), 1)
        return {
            "chair_s": bad_captions / n,
            "chair_i": hallucinated / max(named, 1),
            "recall": covered / max(gold, 1),
            "f1": 2 * covered / max(named + gold, 1),
            "mean_len": words / n,
            "n": len(captions),
        }
