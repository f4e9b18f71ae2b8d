"""Every toy-world method in one place: ``load_all_methods()`` imports the modules that call
``register_method``, so listings and ``compare`` see them all."""

from __future__ import annotations

import importlib

from .evaluate import METHODS, MethodFactory

METHOD_MODULES: tuple[str, ...] = (
    "eval_suites.peers.toyworld_methods",  # vcd, dola
    "eval_suites.toyworld.lexvla_method",  # lexvla + its controls
    "eval_suites.toyworld.steered_methods",  # vlsae, vlsae-shift, vlsae-reference + controls
    "eval_suites.toyworld.oracle_methods",  # vlsae-oracle-data (an upper bound on oracle data) + controls
    "eval_suites.toyworld.rawstate",  # <method>-rawstate: random-projection ablations
)


def load_all_methods() -> dict[str, MethodFactory]:
    """Import every registering module; return the methods by name (greedy first)."""
    for module in METHOD_MODULES:
        importlib.import_module(module)
    return dict(METHODS)
