"""vlsae_hooks: steer a Hugging Face vision-language model through a sparse concept space.

    handle = vlsae_hooks.attach(model)          # or attach(model, "path/to/space", alpha=0.7)
    model.generate(**inputs)
    handle.remove()                             # or: with vlsae_hooks.attach(model): ...
"""

from vlsae_hooks.attach import SteeringHandle, attach
from vlsae_hooks.modes import (
    ContrastOptions,
    EvidenceOptions,
    GroundingOptions,
    LexicalOptions,
    NoOpSteering,
    ReferenceOptions,
    ShiftOptions,
    mode_names,
    register_mode,
)
from vlsae_hooks.patch_readout import PatchReadout
from vlsae_hooks.registry import KNOWN_SPACES, KnownSpace, find_space, register_space
from vlsae_hooks.spaces import VLSAE, AuxAligner, ConceptSpace, SpaceConfig, VLSAESpace, load_space
from vlsae_hooks.word_evidence import WordReadout

__all__ = ["KNOWN_SPACES", "AuxAligner", "ConceptSpace", "ContrastOptions", "EvidenceOptions",
           "GroundingOptions", "KnownSpace", "LexicalOptions", "NoOpSteering", "PatchReadout",
           "ReferenceOptions", "ShiftOptions", "SpaceConfig", "SteeringHandle", "VLSAE",
           "VLSAESpace", "WordReadout", "attach", "find_space", "load_space", "mode_names",
           "register_mode", "register_space"]
