"""What ``decode_overhead.py`` times: the method table (plain greedy, every vlsae steering method
and the peers, each as it is set up for timing) and the diagnostics that take a mode apart; the
models and spaces they run on are ``decode_models.py``'s.

The peers are imported when they are set up, so a tree whose peers differ still times every vlsae
method. Peers run at their published defaults; what would need fitting data is random of the
right shape (VTI's directions), as only the cost is measured; VISTA computes its vectors at
prefill.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from decode_models import random_patch_readout
from torch import Tensor, nn

from vlsae_hooks import attach
from vlsae_hooks.adapters import adapter_for
from vlsae_hooks.spaces import ConceptSpace
from vlsae_hooks.testing import random_space

Setup = Callable[[nn.Module, ConceptSpace], contextlib.AbstractContextManager]
"""A method: (model, space) -> a context manager under which ``generate`` decodes with it."""


def steering(**options) -> Setup:
    """``attach(model, space, **options)``; with no options the space's recommendation."""
    return lambda model, space: attach(model, space, **options)


def random_vti(model: nn.Module, space: ConceptSpace):
    """VTI at its default strengths with random directions of the fitted ones' shapes: one per
    language layer [D], one per vision layer and vision token [tokens, D]."""
    from eval_suites.peers.vti import LatentSteering, vision_layers

    g = torch.Generator().manual_seed(2)
    dtype = next(model.parameters()).dtype
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1  # patches + class token
    text_shape = (len(adapter_for(model).layers(model)), adapter_for(model).hidden_size(model))
    vision_shape = (len(vision_layers(model)), tokens, vision.hidden_size)
    return LatentSteering(model, torch.randn(text_shape, generator=g).to(dtype),
                          torch.randn(vision_shape, generator=g).to(dtype), 0.4, 0.4)


def vcd(model: nn.Module, space: ConceptSpace):
    from eval_suites.peers.vcd import VisualContrast

    return VisualContrast(model, alpha=1.0, beta=0.1, noise_step=500)


def dola(model: nn.Module, space: ConceptSpace):
    from eval_suites.peers.dola import LayerContrast

    return LayerContrast(model, layers="high", relative_top=0.1)


def vista(model: nn.Module, space: ConceptSpace):
    from eval_suites.peers.vista import VisualSteering

    return VisualSteering(model, lam=0.1)


def grounding(model: nn.Module, space: ConceptSpace):
    """Mode grounding at its defaults, with the space's patch readout or, for a space without
    one (the tiny random ones), a random readout of COCO's size put beside it."""
    if getattr(space, "patch_readout", None) is None:
        vocab = model.get_output_embeddings().out_features
        space.patch_readout = random_patch_readout(space.config.d_model, vocab,
                                                   next(model.parameters()).dtype)
    return attach(model, space, mode="grounding")


METHODS: dict[str, Setup] = {
    "plain": lambda model, space: contextlib.nullcontext(),
    "vlsae": steering(),
    "vlsae-contrast": steering(mode="contrast"),
    "vlsae-shift": steering(mode="shift"),
    "vlsae-reference": steering(mode="reference"),
    # both readouts run: the word readout's strength spelled out, the phrase one's (0 by default)
    "vlsae-evidence": steering(mode="evidence", strength=5.0, phrase_strength=1.0),
    "vlsae-cutoff": steering(mode="contrast", contrast_weight=0.0, plausibility_cutoff=0.8),
    "vlsae-grounding": grounding,
    "vcd": vcd,
    "dola": dola,
    "vti": random_vti,
    "vista": vista,
}
"""Every method timed, by name, as it is set up for timing (the peers at their defaults)."""


Offset = Callable[..., Tensor]
"""``Realigner.offset``'s signature: (realigner, values, indices, image_term, text_mean)."""


def with_offset(mode: str, replace: Callable[[Offset, ConceptSpace], Offset]) -> Setup:
    """``mode`` with ``Realigner.offset`` (the step's realignment) replaced, while attached, by
    ``replace(offset, space)``, and restored after."""

    @contextlib.contextmanager
    def setup(model: nn.Module, space: ConceptSpace):
        from vlsae_hooks.realignment import Realigner

        offset = Realigner.offset
        Realigner.offset = replace(offset, space)
        try:
            with attach(model, space, mode=mode):
                yield
        finally:
            Realigner.offset = offset

    return setup


def without_realignment(mode: str, read_concepts: bool = False) -> Setup:
    """``mode`` with the realignment (the space's encode and decode of the text mean) replaced
    by a zero shift: what the mode's hooks, state and, for contrast, its steered branch and
    logits cost apart from the space's work. ``read_concepts``: the zero shift comes after the
    product of the running text mean with C^T that the step's cosines run (the concept matrix
    read back from memory, nothing done with the scores), which splits the realignment's cost
    into that read and the rest."""

    def zero(offset: Offset, space: ConceptSpace) -> Offset:
        concepts_t = None
        if read_concepts:
            encoder = space.text_step_encoder()
            if encoder is None or encoder.concepts_t.shape[0] != space.config.d_model:
                raise ValueError(f"the read diagnostic multiplies the text mean by C^T: it needs "
                                 f"a space with a step encoder whose concepts are as wide as "
                                 f"the model ({space.kind} space)")
            concepts_t = encoder.concepts_t

        def zero_offset(self, values: Tensor, indices: Tensor, image_term: Tensor | None,
                        text_mean: Tensor) -> Tensor:
            if concepts_t is not None:
                torch.mm(text_mean.to(concepts_t.dtype), concepts_t)
            return torch.zeros_like(text_mean[:, None], dtype=torch.float32)

        return zero_offset

    return with_offset(mode, zero)


def compiled_realignment(mode: str) -> Setup:
    """``mode`` with its realignment (the encode of the running text mean and the decode of its
    concepts onto the image's part: eleven kernels a step) compiled by ``torch.compile`` into
    fused ones: what fusing them buys. Inductor on a CPU builds C++ (it needs a compiler); the
    compiled graph is made at the first step and reused while the shapes stay."""

    def compiled(offset: Offset, space: ConceptSpace) -> Offset:
        return torch.compile(offset, dynamic=False, fullgraph=True)  # a function: binds as one

    return with_offset(mode, compiled)


SMALL_SPACE_CONCEPTS = 256
"""Concepts of the small space the ``-small-space`` diagnostics steer with."""
RESIZED_SPACE_CONCEPTS = (1024, 4096)
"""Concept counts of the ``vlsae-shift-N-concepts`` diagnostics, beside the small space's and
the toy space's own 2,048: shift's cost against the size of the concept matrix it reads."""


def resized_space(model: nn.Module, space: ConceptSpace, n_concepts: int) -> ConceptSpace:
    """A random space like ``space`` (same layer, k, aligner and dtype) with ``n_concepts``
    concepts: a step does the same operations on a smaller or larger concept matrix."""
    config = space.config
    return random_space(model, layer=config.layer, n_concepts=n_concepts,
                        k=min(config.k, n_concepts), site=config.site,
                        aligner=config.has_aligner).to(space.device, space.dtype)


def with_concepts(mode: str, n_concepts: int) -> Setup:
    """``mode`` steered with ``resized_space``: the mode's hooks and realignment at the same
    cost per operation, with a concept matrix of another size read at every step."""
    return lambda model, space: attach(model, resized_space(model, space, n_concepts), mode=mode)


DIAGNOSTICS: dict[str, Setup] = {
    "vlsae-shift-hooks": without_realignment("shift"),
    "vlsae-shift-hooks-read": without_realignment("shift", read_concepts=True),
    "vlsae-contrast-hooks": without_realignment("contrast"),
    "vlsae-shift-small-space": with_concepts("shift", SMALL_SPACE_CONCEPTS),
    "vlsae-contrast-small-space": with_concepts("contrast", SMALL_SPACE_CONCEPTS),
    **{f"vlsae-shift-{n}-concepts": with_concepts("shift", n) for n in RESIZED_SPACE_CONCEPTS},
    "vlsae-shift-compiled": compiled_realignment("shift"),
    "vlsae-contrast-compiled": compiled_realignment("contrast"),
}
"""Timed only when asked for (``--methods``): not methods, parts of one."""
SETUPS: dict[str, Setup] = {**METHODS, **DIAGNOSTICS}
