"""What a real model's patch readout predicts: units (COCO categories as objects, colour words
as attributes) and the single tokens that spell them in the model's tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae_training.patch_readout import spelling_ids
from sae_training.samples import DataError
from vlsae_hooks.patch_readout import NO_TOKEN


@dataclass(frozen=True)
class Unit:
    """A readout output: an object (a COCO category) or an attribute (a colour), and the words
    that spell it."""

    name: str
    words: tuple[str, ...]
    is_attribute: bool

    @property
    def kind(self) -> str:
        return "attribute" if self.is_attribute else "object"


def attribute_units(words: str) -> list[Unit]:
    """``attribute_words`` ("red,gray/grey") as units, a unit's synonyms joined by '/'."""
    units = []
    for entry in words.split(","):
        spellings = tuple(w.strip().lower() for w in entry.split("/") if w.strip())
        if spellings:
            units.append(Unit(spellings[0], spellings, True))
    if not units:
        raise DataError("--attribute-words names no word")
    return units


def spell_units(tokenizer, units: list[Unit]) -> tuple[list[Unit], Tensor, list[dict]]:
    """(the units the tokenizer spells, their token ids [M, S] padded with -1, the others
    with the reason): a unit keeps its single-token spellings that no other unit has."""
    rows: dict[int, list[int]] = {}
    dropped = []
    for i, unit in enumerate(units):
        try:
            ids = spelling_ids(tokenizer, [unit.words])[0]
        except ValueError:
            dropped.append({"name": unit.name, "kind": unit.kind, "reason": "no word of it "
                            f"({', '.join(unit.words)}) is one token of the tokenizer"})
            continue
        rows[i] = [int(t) for t in ids if t != NO_TOKEN]
    owners: dict[int, list[int]] = {}
    for i, ids in rows.items():
        for token in ids:
            owners.setdefault(token, []).append(i)
    kept_units, kept_rows = [], []
    for i, ids in rows.items():
        own = [t for t in ids if len(owners[t]) == 1]
        if own:
            kept_units.append(units[i])
            kept_rows.append(own)
            continue
        others = sorted({units[j].name for t in ids for j in owners[t] if j != i})
        dropped.append({"name": units[i].name, "kind": units[i].kind, "reason": "each of its "
                        f"tokens also spells {', '.join(others)} (a token spells one unit)"})
    if not kept_units:
        raise DataError("the tokenizer spells none of the units with one token")
    width = max(map(len, kept_rows))
    ids = torch.tensor([row + [NO_TOKEN] * (width - len(row)) for row in kept_rows])
    return kept_units, ids, dropped
