"""Which LM tokens count as words: LexVLA keeps a pruned vocabulary of meaningful tokens
(17,149 of Llama-2's 32,000), so that image and caption vectors spend no mass on punctuation,
sub-word pieces or function words."""

from __future__ import annotations

from collections import Counter

from vlsae_hooks.spaces.lexvla import WORD_START_MARKERS

STOPWORDS: tuple[str, ...] = (
    "a", "about", "above", "after", "again", "against", "all", "am", "an", "and", "any", "are",
    "as", "at", "be", "because", "been", "before", "being", "below", "between", "both", "but",
    "by", "can", "could", "did", "do", "does", "doing", "down", "during", "each", "few", "for",
    "from", "further", "had", "has", "have", "having", "he", "her", "here", "hers", "herself",
    "him", "himself", "his", "how", "i", "if", "in", "into", "is", "it", "its", "itself",
    "just", "me", "more", "most", "my", "myself", "no", "nor", "not", "now", "of", "off", "on",
    "once", "only", "or", "other", "our", "ours", "ourselves", "out", "over", "own", "same",
    "she", "should", "so", "some", "such", "than", "that", "the", "their", "theirs", "them",
    "themselves", "then", "there", "these", "they", "this", "those", "through", "to", "too",
    "under", "until", "up", "very", "was", "we", "were", "what", "when", "where", "which",
    "while", "who", "whom", "why", "will", "with", "would", "you", "your", "yours", "yourself",
    "yourselves",
)


def prune_vocabulary(tokenizer, words: list[str] | None = None, min_length: int = 2,
                     stopwords: list[str] | None = None) -> tuple[list[str], list[int]]:
    """(kept token strings, their ids) in id order.

    ``words`` given: exactly those tokens (an unknown word is an error). Otherwise the rule:
    alphabetic, at least ``min_length`` letters, lower-cased not a stopword, not special; when
    the tokenizer marks word starts ("▁"/"Ġ"), only word-start tokens (so "ing" pieces go).
    """
    vocab: dict[str, int] = tokenizer.get_vocab()
    if words is not None:
        missing = [w for w in words if w not in vocab]
        if missing:
            raise ValueError(f"vocabulary words not in the text tokenizer: {missing}")
        repeated = sorted(w for w, n in Counter(words).items() if n > 1)
        if repeated or not words:
            raise ValueError(f"the vocabulary repeats {repeated}: each word is one unit"
                             if repeated else "the vocabulary is empty: give at least one word")
        return list(words), [vocab[w] for w in words]
    special = set(getattr(tokenizer, "all_special_tokens", []))
    stop = {w.lower() for w in (STOPWORDS if stopwords is None else stopwords)}
    marked = any(t.startswith(WORD_START_MARKERS) for t in vocab)
    kept = []
    for token, index in sorted(vocab.items(), key=lambda item: item[1]):
        starts_word = token.startswith(WORD_START_MARKERS)
        bare = token[1:] if starts_word else token
        if token in special or (marked and not starts_word):
            continue
        if bare.isalpha() and len(bare) >= min_length and bare.lower() not in stop:
            kept.append((token, index))
    if not kept:
        raise ValueError("the pruning rule kept no token; pass the words explicitly")
    return [t for t, _ in kept], [i for _, i in kept]


def leading_space(tokenizer) -> str:
    """What to put before a text for the tokenizer to write its first word as it writes a word
    inside a text: a space for a byte-level BPE (its "Ġ" marks a word after a space only), nothing
    for SentencePiece (it adds its "▁" itself)."""
    return " " if any(token.startswith("Ġ") for token in tokenizer.get_vocab()) else ""


def phrase_token_ids(tokenizer, phrases: list[str] | None) -> list[list[int]]:
    """The token ids of each multi-word unit, as the tokenizer writes it inside a text (no
    special tokens); a phrase must cover at least two tokens (one token is a word)."""
    out, lead = [], leading_space(tokenizer)
    for phrase in phrases or []:
        ids = tokenizer(lead + phrase, add_special_tokens=False)["input_ids"]
        unknown = getattr(tokenizer, "unk_token_id", None)
        if len(ids) < 2 or (unknown is not None and unknown in ids):
            raise ValueError(f"phrase {phrase!r} is not a run of at least two known tokens "
                             f"({ids})")
        out.append(list(ids))
    return out


def contains_run(ids: list[int], run: list[int]) -> bool:
    """Does ``run`` occur as consecutive tokens in ``ids``."""
    n = len(run)
    return any(ids[i:i + n] == run for i in range(len(ids) - n + 1))
