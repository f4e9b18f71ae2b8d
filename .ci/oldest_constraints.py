"""Print constraints.txt with torch, torchvision, transformers and huggingface_hub pinned at the
oldest versions that pyproject.toml allows (their ``>=`` bounds), for CI's second test run: the
floors we declare for what we hook into most closely are tested, not assumed. The packages whose
versions torch itself pins (its CUDA libraries, triton, sympy) are left to the older torch;
everything else stays as constraints.txt pins it."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

FLOORED = ("torch", "torchvision", "transformers", "huggingface_hub")
FOLLOW_TORCH = re.compile(r"(nvidia-.*|cuda-.*|triton|sympy)")
"""Pinned by each torch release for itself: constraints.txt's pins fit only the torch it pins."""


def canonical(name: str) -> str:
    """A distribution name as pip compares them (``huggingface_hub`` = ``huggingface-hub``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def floors(pyproject: Path) -> dict[str, str]:
    """{canonical name: its ``>=`` bound} for the ``FLOORED`` dependencies."""
    found = {}
    for requirement in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,\s]+).*", requirement)
        if match and canonical(match[1]) in map(canonical, FLOORED):
            found[canonical(match[1])] = match[2]
    missing = set(map(canonical, FLOORED)) - set(found)
    if missing:
        sys.exit(f"pyproject.toml declares no '>=' bound for {sorted(missing)}")
    return found


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    pins = floors(root / "pyproject.toml")
    for line in (root / "constraints.txt").read_text().splitlines():
        name = line.split("==")[0].strip()
        if canonical(name) not in pins and not FOLLOW_TORCH.fullmatch(canonical(name)):
            print(line)
    for name, version in pins.items():
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
