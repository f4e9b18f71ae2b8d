"""What one forward call of a steered model passes from its first hook to its last
(``layer_steering``): made when the call starts, dropped when it ends.

Threads: what one forward passes between the hooks is one ``ForwardCall`` per call, kept per
thread, and what lasts across steps lives in the call's own cache, so concurrent ``generate``
calls on one attached model (each with its own cache, as ``generate`` makes) decode exactly as
if run one after another. The call's record goes when its forward ends, whether it returns or
raises (the output hook is always called; after a ``KeyboardInterrupt``, which torch lets pass,
the next call's start drops it), so a decoder layer run on its own afterwards is refused, never
steered with it, and a failed call keeps nothing it held (its image, its state) alive.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from vlsae_hooks.cache_state import SteeringState


@dataclass(slots=True)
class ForwardCall:
    """What one forward call passes between the hooks, and only what every layer mode needs; a
    mode that passes more from its site to its logits subclasses it (``LayerSteerer.Forward``).
    One per call, held per thread (the module docstring)."""

    input_ids: Tensor
    tokens: Tensor | None
    """[B, T]: which of the call's positions hold tokens, not padding (``call_positions``); None
    without an attention mask."""
    labels_given: bool
    image_input: object
    """pixel_values, or the image features ``generate`` encoded from them (a prefill only); read
    only to say what a non-finite image position came from."""
    state: SteeringState | None = None
    """The sequence's state: found in the cache when the call is a decoding step, made at the
    site when it is a prefill."""
    text_now: Tensor | None = None
    """bool [B, T]: the positions of this call that are steered (text after an image)."""
