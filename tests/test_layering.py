"""The runtime stands alone: ``vlsae_hooks`` imports nothing from ``sae_training`` or
``eval_suites`` (dependencies point one way: eval_suites -> sae_training -> vlsae_hooks), ships
no toy-world files, and its messages name no training or toy-world command. Within
``eval_suites``, only the toy world imports the toy world: core, peers, reproduce and lmms build
on ``eval_suites.core``."""

import ast
import re
from pathlib import Path

import eval_suites
import vlsae_hooks

RUNTIME = Path(vlsae_hooks.__file__).parent
UPPER = ("sae_training", "eval_suites")
EVAL_SUITES = Path(eval_suites.__file__).parent
SHARED = ("core", "peers", "reproduce", "lmms")
"""The parts of ``eval_suites`` that must not import ``eval_suites.toyworld``."""


def imported_modules(path: Path, root: Path) -> set[str]:
    """Absolute names of every module ``path`` (a file of a package under ``root``) imports,
    anywhere in it, relative imports resolved, and of each name a ``from`` import takes (it may
    be a module too)."""
    package = path.parent.relative_to(root).parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_runtime_imports_neither_training_nor_evaluation():
    sources = sorted(RUNTIME.rglob("*.py"))
    assert sources
    for path in sources:
        upward = {name for name in imported_modules(path, RUNTIME.parent)
                  if name.split(".")[0] in UPPER}
        assert not upward, f"{path.relative_to(RUNTIME)} imports {sorted(upward)}"


def test_runtime_names_no_training_or_toy_world_command_and_ships_no_toy_files():
    for path in sorted(RUNTIME.rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"python -m (sae_training|eval_suites)", text), path
        assert "toy_assets" not in text, path
    assert not (RUNTIME / "toy_assets").exists() and not (RUNTIME / "assets.py").exists()


def test_only_the_toy_world_imports_the_toy_world():
    for part in SHARED:
        sources = sorted((EVAL_SUITES / part).rglob("*.py"))
        assert sources, part
        for path in sources:
            toy = {name for name in imported_modules(path, EVAL_SUITES.parent)
                   if name == "eval_suites.toyworld" or name.startswith("eval_suites.toyworld.")}
            assert not toy, f"{path.relative_to(EVAL_SUITES)} imports {sorted(toy)}"
