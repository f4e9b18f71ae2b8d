"""One module per steering mode, each an options dataclass and a steerer, registered by name.

    contrast   the reference's method with the KV cache (plain and steered logits contrasted)
    reference  contrast without the cache: the reference's computation
    shift      the realignment shift alone, one branch, plain cost
    evidence   the word / phrase readouts' evidence added to the logits, no state moves
    lexical    a LexVLA space's image words as evidence on the logits
    grounding  a per-patch readout's evidence on attribute and object words, bound per patch

A new mode is a new module here that calls ``register_mode(name, options_cls, steerer_cls)``
(and is imported below, or by whoever uses it).
"""

from vlsae_hooks.modes.contrast import ContrastOptions, ContrastSteerer
from vlsae_hooks.modes.evidence import EvidenceOptions, EvidenceSteerer
from vlsae_hooks.modes.grounding import GroundingOptions, GroundingSteerer
from vlsae_hooks.modes.lexical import LexicalOptions, LexicalSteerer
from vlsae_hooks.modes.reference import ReferenceOptions, ReferenceSteerer
from vlsae_hooks.modes.registry import (
    ModeSpec,
    NoOpSteering,
    Steerer,
    build_options,
    mode_names,
    mode_spec,
    modes_taking,
    register_mode,
)
from vlsae_hooks.modes.shift import ShiftOptions, ShiftSteerer

__all__ = ["ContrastOptions", "ContrastSteerer", "EvidenceOptions", "EvidenceSteerer",
           "GroundingOptions", "GroundingSteerer", "LexicalOptions", "LexicalSteerer", "ModeSpec",
           "NoOpSteering", "ReferenceOptions", "ReferenceSteerer", "ShiftOptions", "ShiftSteerer",
           "Steerer", "build_options", "mode_names", "mode_spec", "modes_taking", "register_mode"]
