"""The peers as toy-world methods (``python -m eval_suites.toyworld evaluate --method vcd``).

Greedy decoding under each peer's published default settings, so they compare with ``greedy``
on the same scenes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from eval_suites.toyworld.evaluate import Decoder, HFDecoder, register_method

from .dola import LayerContrast
from .vcd import VisualContrast


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


register_method("vcd", vcd)
register_method("dola", dola)
