"""The runtime stands alone: ``vlsae_hooks`` imports nothing from ``sae_training`` or
``eval_suites`` (dependencies point one way: eval_suites -> sae_training -> vlsae_hooks), ships
no toy-world files, and its messages name no training or toy-world command."""

import ast
import re
from pathlib import Path

import vlsae_hooks

RUNTIME = Path(vlsae_hooks.__file__).parent
UPPER = ("sae_training", "eval_suites")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_runtime_imports_neither_training_nor_evaluation():
    sources = sorted(RUNTIME.rglob("*.py"))
    assert sources
    for path in sources:
        upward = {name for name in imported_modules(path) if name.split(".")[0] in UPPER}
        assert not upward, f"{path.relative_to(RUNTIME)} imports {sorted(upward)}"


def test_runtime_names_no_training_or_toy_world_command_and_ships_no_toy_files():
    for path in sorted(RUNTIME.rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"python -m (sae_training|eval_suites)", text), path
        assert "toy_assets" not in text, path
    assert not (RUNTIME / "toy_assets").exists() and not (RUNTIME / "assets.py").exists()
