"""Reading the JSON-lines files runs write (training logs, answer journals)."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: str | Path) -> list[dict]:
    """Every line of a JSON-lines file as a record (a blank or torn line fails), the file
    closed after."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]
