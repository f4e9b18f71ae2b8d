"""Every toy-world method in one place: the modules imported here register their methods in
``eval_suites.core.methods`` when imported, so listings and ``compare`` see them all."""

from __future__ import annotations

from ..core.methods import METHODS, MethodFactory
from ..peers import methods as peer_methods  # noqa: F401  vcd, dola, vista (+ wrong-image control)
from . import (
    grounding,  # noqa: F401  vlsae-grounding (+ controls), vlsae-grounding-captions
    lexvla_method,  # noqa: F401  lexvla + its controls
    oracle_methods,  # noqa: F401  vlsae-oracle-data (an upper bound) + controls
    rawstate,  # noqa: F401  <method>-rawstate: random-projection ablations
    steered_methods,  # noqa: F401  vlsae, vlsae-shift, vlsae-reference + controls
    vti_method,  # noqa: F401  vti, fitted on toy training scenes
)


def toy_methods() -> dict[str, MethodFactory]:
    """The registered methods by name (greedy first): the toy world's, and any registered since."""
    return dict(METHODS)
