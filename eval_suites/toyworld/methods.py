"""Every toy-world method in one place: the modules imported here register their methods in
``eval_suites.core.methods`` when imported, so listings and ``compare`` see them all."""

from __future__ import annotations

from ..core.methods import METHODS, MethodFactory
from ..peers import methods as peer_methods  # noqa: F401  vcd, dola, vista (+ wrong-image control)
from . import vti_method  # noqa: F401  vti, fitted on toy training scenes
from . import lexvla_method  # noqa: F401  lexvla + its controls
from . import steered_methods  # noqa: F401  vlsae, vlsae-shift, vlsae-reference + controls
from . import oracle_methods  # noqa: F401  vlsae-oracle-data (an upper bound on oracle data) + controls
from . import rawstate  # noqa: F401  <method>-rawstate: random-projection ablations


def toy_methods() -> dict[str, MethodFactory]:
    """The registered methods by name (greedy first): the toy world's, and any registered since."""
    return dict(METHODS)
