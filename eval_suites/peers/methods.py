"""The data-free peers as registered methods (``evaluate --method vcd``): greedy decoding under
each peer's published default settings, so they compare with ``greedy`` on the same scenes.

VTI needs fitting data, which only a frontend has: the toy world registers it
(``eval_suites.toyworld.vti_method``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..core.decoder import Decoder, HFDecoder
from ..core.methods import MethodFactory, register_method
from .dola import LayerContrast
from .vcd import VisualContrast
from .vista import VisualSteering

VISTA_LAMBDA = 0.1
"""VISTA strength: one value for POPE and captions, between its code's 0.01 (POPE) and 0.17
(CHAIR)."""


@contextlib.contextmanager
def vcd(model, processor) -> Iterator[Decoder]:
    """VCD: alpha 1, plausibility beta 0.1, noise step 500 of 1000."""
    with VisualContrast(model, alpha=1.0, beta=0.1, noise_step=500):
        yield HFDecoder(model, processor, do_sample=False)


@contextlib.contextmanager
def dola(model, processor) -> Iterator[Decoder]:
    """DoLa-style contrast with the upper-half early exits, relative top 0.1."""
    with LayerContrast(model, layers="high", relative_top=0.1):
        yield HFDecoder(model, processor, do_sample=False)


def vista(image_source: str) -> MethodFactory:
    """VISTA at lambda ``VISTA_LAMBDA``; ``image_source`` "other" steers each row with the vector
    of a row showing another image (the wrong-image control)."""

    @contextlib.contextmanager
    def method(model, processor) -> Iterator[Decoder]:
        with VisualSteering(model, lam=VISTA_LAMBDA, image_source=image_source):
            yield HFDecoder(model, processor, do_sample=False)

    return method


register_method("vcd", vcd)
register_method("dola", dola)
register_method("vista", vista("own"))
register_method("vista-wrongimage", vista("other"))
