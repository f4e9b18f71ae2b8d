"""CHAIR (Rohrbach et al., 2018): how many of the objects a caption names are not in the image.

Our own scorer, with no NLTK data to download: words are singularised by lemminflect (its data
ships in the wheel) and matched against each object's synonym phrases, longest phrase first.
Works for the toy world and for COCO synonym lists a user brings. CHAIR_I counts every mention,
as the original script and lmms-eval do (a caption that names a missing object twice holds two
hallucinated mentions); ``per_mention=False`` counts each object once per caption instead (the
toy world's reports).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from typing import TypeVar

from lemminflect import getLemma

_WORD = re.compile(r"[a-z]+")
T = TypeVar("T")


@lru_cache(maxsize=65536)
def singular(word: str) -> str:
    """'forks' -> 'fork'; words lemminflect does not know as nouns are kept."""
    lemmas = getLemma(word, upos="NOUN")
    return lemmas[0] if lemmas else word


def _tokens(text: str) -> list[str]:
    return [singular(w) for w in _WORD.findall(text.lower())]


class ChairScorer:
    """Finds object mentions in captions and scores them against per-image ground truth."""

    def __init__(self, synonyms: Mapping[str, Sequence[str]], *, per_mention: bool = True,
                 aliases: Mapping[str, str] | None = None,
                 dropped: Mapping[str, str] | None = None) -> None:
        """``synonyms``: object name -> phrases that name it (the name itself is always one).
        ``per_mention``: CHAIR_I over every mention (the standard), else over the objects each
        caption names. ``aliases``: phrase -> the words it stands for, replaced before matching
        (CHAIR's rules for COCO: "baby bird" -> "bird", so "baby" names no person).
        ``dropped``: word -> a word whose presence in a caption drops it ("seat" -> "toilet":
        a toilet's seat is no chair)."""
        self.per_mention = per_mention
        self._phrases = _phrase_table(synonyms)
        self._aliases = {tuple(_tokens(k)): tuple(_tokens(v)) for k, v in (aliases or {}).items()}
        self._dropped = {singular(k): singular(v) for k, v in (dropped or {}).items()}
        self._longest = max(len(k) for k in self._phrases)
        self._alias_longest = max((len(k) for k in self._aliases), default=0)

    def _words(self, caption: str) -> list[str]:
        """The caption's singular words, aliases replaced and dropped words gone."""
        out: list[str] = []
        for alias, word in _longest_first(_tokens(caption), self._aliases, self._alias_longest):
            out += alias if alias is not None else [word]
        present = set(out)
        return [w for w in out if self._dropped.get(w) not in present]

    def all_mentions(self, caption: str) -> list[str]:
        """Objects named in ``caption``, once per mention, in order."""
        return [obj for obj, _ in _longest_first(self._words(caption), self._phrases,
                                                 self._longest) if obj is not None]

    def mentions(self, caption: str) -> list[str]:
        """Objects named in ``caption``, each once, in order of first mention."""
        return list(dict.fromkeys(self.all_mentions(caption)))

    def score(self, captions: Sequence[str],
              truths: Sequence[set[str]]) -> dict[str, float | None]:
        """CHAIR_S (captions with any hallucination), CHAIR_I (hallucinated / named: mentions,
        or objects per caption; None when the captions name nothing: 0 of 0 is no evidence of
        faithfulness, and a table would rank naming nothing best), recall (ground-truth objects
        named / ground-truth objects), object F1 (the harmonic mean of 1 - CHAIR_I and recall: a
        method that names less lowers CHAIR_I, not this) and mean caption length in words."""
        if len(captions) != len(truths):
            raise ValueError(f"{len(captions)} captions but {len(truths)} ground-truth sets")
        named = hallucinated = covered = gold = bad_captions = words = 0
        for caption, truth in zip(captions, truths):
            every = self.all_mentions(caption)
            counted = every if self.per_mention else list(dict.fromkeys(every))
            wrong = sum(obj not in truth for obj in counted)
            named += len(counted)
            hallucinated += wrong
            covered += len(set(every) & truth)
            gold += len(truth)
            bad_captions += wrong > 0
            words += len(_WORD.findall(caption.lower()))
        n = max(len(captions), 1)
        right = named - hallucinated  # precision right / named, recall covered / gold
        return {
            "chair_s": bad_captions / n,
            "chair_i": hallucinated / named if named else None,
            "recall": covered / max(gold, 1),
            "f1": 2 * right * covered / max(right * gold + covered * named, 1),
            "mean_len": words / n,
            "n": len(captions),
        }


def _longest_first(words: list[str], table: Mapping[tuple[str, ...], T],
                   longest: int) -> Iterator[tuple[T | None, str]]:
    """Walk ``words``, taking at each place the longest run (up to ``longest`` words) that is a
    key of ``table``: (its value, its first word) for a run, (None, the word) for a word that
    starts none."""
    i = 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            value = table.get(tuple(words[i:i + n]))
            if value is not None:
                yield value, words[i]
                i += n
                break
        else:
            yield None, words[i]
            i += 1


def _phrase_table(synonyms: Mapping[str, Sequence[str]]) -> dict[tuple[str, ...], str]:
    """Singular words of each phrase -> the object it names; a phrase of two objects is an
    error."""
    table: dict[tuple[str, ...], str] = {}
    for obj, phrases in synonyms.items():
        for phrase in (obj, *phrases):
            key = tuple(_tokens(phrase))
            if not key:
                raise ValueError(f"synonym {phrase!r} of {obj!r} has no words")
            owner = table.setdefault(key, obj)
            if owner != obj:
                raise ValueError(f"phrase {phrase!r} names both {owner!r} and {obj!r}")
    return table
