"""What ``decode_overhead.py`` times: the method table (plain greedy, every vlsae steering method
and the peers, each as it is set up for timing) and the models and spaces they run on.

Models (torch and transformers only) and spaces (``vlsae_hooks``) are built apart, so that
``decode_overhead.py --baseline-src`` can build a model once and hand it to two source trees,
each building its own space with its own ``vlsae_hooks``. The peers are imported when they are
set up, so a tree whose peers differ still times every vlsae method.

The 7B geometry model is LLaVA-1.5-7B's shape (Llama 32 x 4096, CLIP ViT-L/14-336, 576 image
tokens) with random bf16 weights, and a VL-SAE of h = 32768, k = 256 with an aligner, stored
bf16, trained-at-layer 30 of 32 as the reference's (steered one layer later), with a random word
readout over 4,096 tokens and a random phrase readout over 4,096 phrases for evidence mode (as
the toy space recommends, with phrases: prefill encodes all 576 image positions and takes every
concept's score at each; a step compares the last token with the phrases' first tokens).
Peers run at their published defaults; what would need fitting data is random of the right
shape (VTI's directions), as only the cost is measured; VISTA computes its vectors at prefill.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from vlsae_hooks import attach, find_space, load_space
from vlsae_hooks.adapters import adapter_for
from vlsae_hooks.phrase_evidence import PhraseReadout
from vlsae_hooks.registry import SPACE_SUBFOLDER
from vlsae_hooks.spaces import VLSAE, AuxAligner, ConceptSpace, SpaceConfig, VLSAESpace
from vlsae_hooks.testing import random_space, tiny_llava
from vlsae_hooks.word_evidence import WordReadout

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
    # strengths given so both readouts run (the toy space recommends strength 0: a no-op)
    "vlsae-evidence": steering(mode="evidence", strength=5.0, phrase_strength=1.0),
    "vlsae-cutoff": steering(mode="contrast", contrast_weight=0.0, plausibility_cutoff=0.8),
    "vlsae-grounding": grounding,
    "vcd": vcd,
    "dola": dola,
    "vti": random_vti,
    "vista": vista,
}
"""Every method timed, by name, as it is set up for timing (the peers at their defaults)."""


def without_realignment(mode: str, read_concepts: bool = False) -> Setup:
    """``mode`` with the realignment (the space's encode and decode of the text mean) replaced
    by a zero shift: what the mode's hooks, state and, for contrast, its steered branch and
    logits cost apart from the space's work. ``read_concepts``: the zero shift comes after the
    product of the running text mean with C^T that the step's cosines run (the concept matrix
    read back from memory, nothing done with the scores), which splits the realignment's cost
    into that read and the rest."""

    @contextlib.contextmanager
    def setup(model: nn.Module, space: ConceptSpace):
        from vlsae_hooks.realignment import Realigner

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

        offset, Realigner.offset = Realigner.offset, zero_offset
        try:
            with attach(model, space, mode=mode):
                yield
        finally:
            Realigner.offset = offset

    return setup


SMALL_SPACE_CONCEPTS = 256
"""Concepts of the small space the ``-small-space`` diagnostics steer with."""


def small_space(model: nn.Module, space: ConceptSpace) -> ConceptSpace:
    """A random space like ``space`` (same layer, k, aligner and dtype) with only
    ``SMALL_SPACE_CONCEPTS`` concepts: its concept matrix stays in cache between steps."""
    config = space.config
    return random_space(model, layer=config.layer, n_concepts=SMALL_SPACE_CONCEPTS,
                        k=min(config.k, SMALL_SPACE_CONCEPTS), site=config.site,
                        aligner=config.has_aligner).to(space.device, space.dtype)


def with_small_space(mode: str) -> Setup:
    """``mode`` steered with ``small_space``: the mode's hooks and realignment at the same cost
    per operation, without reading a large concept matrix back from memory at every step."""
    return lambda model, space: attach(model, small_space(model, space), mode=mode)


DIAGNOSTICS: dict[str, Setup] = {
    "vlsae-shift-hooks": without_realignment("shift"),
    "vlsae-shift-hooks-read": without_realignment("shift", read_concepts=True),
    "vlsae-contrast-hooks": without_realignment("contrast"),
    "vlsae-shift-small-space": with_small_space("shift"),
    "vlsae-contrast-small-space": with_small_space("contrast"),
}
"""Timed only when asked for (``--methods``): not methods, parts of one."""
SETUPS: dict[str, Setup] = {**METHODS, **DIAGNOSTICS}


def random_readout(n_concepts: int, n_tokens: int, dtype: torch.dtype) -> WordReadout:
    """A word readout of the right shape (its values do not change the cost), max-pooled like
    the shipped toy readout: every image position is encoded at prefill."""
    g = torch.Generator().manual_seed(0)
    return WordReadout(torch.randn(n_concepts, n_tokens, generator=g).to(dtype),
                       torch.zeros(n_tokens, dtype=dtype), torch.arange(5, 5 + n_tokens),
                       torch.full((n_tokens,), -3.0), pool="max")


def random_patch_readout(d_model: int, vocab_size: int, dtype: torch.dtype):
    """A patch readout at layer 0 of COCO's size (80 object units, 11 colour units, two
    spellings each; fewer where the vocabulary is small): its values do not change the cost.
    Imported here so that ``--baseline-src`` trees older than mode grounding still load."""
    from vlsae_hooks.patch_readout import PatchReadout

    g = torch.Generator().manual_seed(2)
    m = min(91, (vocab_size - 5) // 2)
    n_objects = m * 80 // 91
    return PatchReadout(torch.randn(d_model, m, generator=g).to(dtype),
                        torch.zeros(m, dtype=dtype), torch.zeros(d_model, dtype=dtype),
                        torch.ones(d_model, dtype=dtype), torch.arange(5, 5 + 2 * m).view(m, 2),
                        torch.arange(m) >= n_objects, layer=0)


def random_phrases(n_concepts: int, n_phrases: int, dtype: torch.dtype) -> PhraseReadout:
    """A phrase readout of the right shape, over the max-pooled dense concept scores."""
    g = torch.Generator().manual_seed(1)
    return PhraseReadout(torch.randn(n_concepts, n_phrases, generator=g).to(dtype),
                         torch.zeros(n_phrases, dtype=dtype), 5 + torch.arange(n_phrases),
                         torch.full((n_phrases,), -3.0), torch.full((n_phrases,), 5))


def default_toy_model() -> str:
    """The shipped toy LLaVA (the benchmark lives beside eval_suites, which ships it)."""
    from eval_suites.toyworld.assets_paths import toy_paths

    return str(toy_paths().llava)


def with_readouts(space: ConceptSpace) -> ConceptSpace:
    """``space`` with random word and phrase readouts (32 each) where it has none."""
    if space.word_readout is None:
        space.word_readout = random_readout(space.config.n_concepts, 32, torch.float32)
    if space.phrase_readout is None:
        space.phrase_readout = random_phrases(space.config.n_concepts, 32, torch.float32)
    return space


def toy_model(path: str | None, device: str = "cpu") -> nn.Module:
    """The toy LLaVA at ``path``, or (None) a random tiny LLaVA, on ``device``."""
    if path is None:
        return tiny_llava().to(device)
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path).to(device).eval()


def toy_space(model: nn.Module, path: str | None) -> tuple[ConceptSpace, str]:
    """The space of the toy LLaVA at ``path`` (the ``vlsae_space`` folder beside it, else the
    one registered for ``model``, else a random one), with readouts, and what it is in words.
    ``model`` is that LLaVA or one with the same weights (side by side, each tree reads the
    space and its recommended steering from its own toy assets)."""
    if path is None:
        return with_readouts(random_space(model, layer=2)), "random tiny LLaVA (no toy assets)"
    beside = Path(path) / SPACE_SUBFOLDER
    found = beside if beside.is_dir() else find_space(model)
    space = load_space(found) if found else random_space(model, layer=len(
        model.model.language_model.layers) // 2)
    return with_readouts(space), f"{path} ({'its space' if found else 'random space'})"


def load_toy(path: str | None, device: str = "cpu"):
    """(model, space, description): the shipped toy LLaVA and its space, or a random tiny LLaVA
    with a random space, on ``device``."""
    model = toy_model(path, device)
    space, description = toy_space(model, path)
    return model, space.to(device), description


def llava_7b_model(n_layers: int, vision_layers: int, device: str = "cpu") -> nn.Module:
    """LLaVA-1.5-7B's shapes with random bf16 weights (plain init, no meta device), built on
    ``device`` (initialised there: a GPU draws 7B random weights in seconds)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                       num_hidden_layers=vision_layers, num_attention_heads=16,
                                       image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                num_hidden_layers=n_layers, num_attention_heads=32,
                                num_key_value_heads=32, vocab_size=32064,
                                max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0),
        image_token_index=32000, image_seq_length=576, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = 0
    return model


def train_layer(n_layers: int) -> int:
    """Where the 7B geometry's space was trained: layer 30 of 32, scaled (it steers one later)."""
    return max(0, min(n_layers - 2, round(30 * n_layers / 32)))


def llava_7b_space(n_layers: int) -> ConceptSpace:
    """The reference-size VL-SAE space for ``llava_7b_model(n_layers, ...)``, with readouts over
    4,096 tokens and 4,096 phrases, recommending evidence mode with phrases (seeded: the same
    weights wherever it is built)."""
    torch.manual_seed(1)
    space_config = SpaceConfig(kind="vlsae", d_model=4096, n_concepts=32768, k=256,
                               model_name="llava-hf/llava-1.5-7b-hf", model_type="llava",
                               site="layer_input", layer=train_layer(n_layers), has_aligner=True,
                               source="reference")
    space = VLSAESpace(VLSAE(4096, 32768, 256), AuxAligner(4096), space_config)
    space.word_readout = random_readout(32768, 4096, torch.bfloat16)
    space.phrase_readout = random_phrases(32768, 4096, torch.bfloat16)
    space.patch_readout = random_patch_readout(4096, 32064, torch.bfloat16)
    space.recommended_steering = {"mode": "evidence", "phrase_strength": 1.0}
    return space.to(torch.bfloat16).eval()


def llava_7b_geometry(n_layers: int, vision_layers: int, device: str = "cpu"):
    """(model, space) of LLaVA-1.5-7B's shapes (``llava_7b_model``, ``llava_7b_space``) on
    ``device``."""
    return (llava_7b_model(n_layers, vision_layers, device),
            llava_7b_space(n_layers).to(device))


def prompt_inputs(model, n_text: int = 24) -> dict:
    """One image prompt, LLaVA style: ``<s> <image>*n text``, with a random image, on the
    model's device."""
    config = model.config
    vision = config.vision_config
    torch.manual_seed(0)
    vocab = config.text_config.vocab_size
    text = torch.randint(5, vocab, (n_text,))  # ids 0-4: pad / bos / eos / unk-like specials
    text[text == config.image_token_id] = 5
    image = torch.full((config.image_seq_length,), config.image_token_id)
    ids = torch.cat([torch.tensor([1]), image, text])[None]
    weight = next(model.parameters())
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size, dtype=weight.dtype)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)
    return {name: value.to(weight.device) for name, value in inputs.items()}
