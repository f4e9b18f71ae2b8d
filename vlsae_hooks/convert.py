"""Load the VL-SAE authors' released weights (plain ``torch.save`` state dicts) as a ``VLSAESpace``.

The reference publishes, per model (ModelScope ``ssfgunner/VL-SAE``):

- an SAE ``.pth``: ``encoder`` [h, d] (the concept matrix C), ``vision_decoder.weight`` [d, h] +
  ``.bias`` [d], ``text_decoder.weight`` [d, h] + ``.bias`` [d];
- for LLaVA-1.5 also an auxiliary ``.pt``: ``vision_projection``, ``text_projection``,
  ``vision_decoder``, ``text_decoder``, each ``.weight`` [d, d] + ``.bias`` [d] (the explicit
  alignment autoencoder). OpenCLIP spaces have none: CLIP is aligned already.

Files are read with ``torch.load(weights_only=True)`` only (never a full unpickle, which could
run code; ``reference_files``), checked key by key and shape by shape, and mapped onto our
modules one to one, so the loaded space computes exactly the reference's encoder and decoders.
``convert_reference`` then saves it once as our ``model.safetensors`` + ``config.json``
(``source: "reference"``).

Where the reference reads and where it steers (they differ):
the SAE was trained on the INPUT of decoder layer 30 of LLaVA-1.5-7B's 32 (0-based), but the
reference steers the OUTPUT of layer 30 (= input of layer 31). A converted space records where it
was trained (``site="layer_input", layer=30``) and ``attach`` steers one layer later for
``source="reference"`` spaces, as the reference does. To steer where it was trained instead:
``attach(model, space, layer=30, site="input")``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from vlsae_hooks.caller_line import callers_stacklevel
from vlsae_hooks.reference_files import check_keys, check_shapes, read_state_dict
from vlsae_hooks.spaces import SPACE_CLASSES
from vlsae_hooks.spaces.autoencoder import VLSAE, AuxAligner
from vlsae_hooks.spaces.base import ConceptSpace
from vlsae_hooks.spaces.config import SpaceConfig
from vlsae_hooks.spaces.folder import CONFIG_NAME, read_config
from vlsae_hooks.spaces.vlsae import VLSAESpace

SAE_KEYS = ("encoder", "vision_decoder.weight", "vision_decoder.bias", "text_decoder.weight",
            "text_decoder.bias")
AUX_MODULES = ("vision_projection", "text_projection", "vision_decoder", "text_decoder")
AUX_KEYS = tuple(f"{module}.{part}" for module in AUX_MODULES for part in ("weight", "bias"))

REFERENCE_K = 256
"""Active concepts per row in every released space (``*_256_8_*``: k = 256, h = 8 d); used when
neither the caller nor the file name says."""
REFERENCE_NAME = re.compile(r"_(\d+)_(\d+)_best\.pth?$")
"""The reference's file names end in ``_{k}_{expansion}_best.pth`` (h = expansion x d)."""
REFERENCE_LLAVA = "llava-hf/llava-1.5-7b-hf"
REFERENCE_LAYER, REFERENCE_DEPTH = 30, 32
"""The reference's training site: input of decoder layer 30 of 32 (0-based)."""
METRICS_NAME = "metrics.json"
"""A trained space's evaluation beside it (``sae_training``): it describes the old weights."""
OPENCLIP_WIDTHS = (512, 768, 1024)
"""Embedding widths of the released OpenCLIP spaces (ViT-B/32, B/16: 512; L/14: 768; H/14: 1024)."""


def reference_layer(n_layers: int = REFERENCE_DEPTH) -> int:
    """The reference's training layer for a decoder of ``n_layers``: the same place counted from
    the end (30 of 32 is the second-to-last layer), so the one-layer-later steering site exists."""
    if n_layers < 2:
        raise ValueError(f"need at least 2 decoder layers to place the reference's site, "
                         f"got {n_layers}")
    return n_layers - (REFERENCE_DEPTH - REFERENCE_LAYER)


def _sae_dims(sae: dict[str, Tensor], path: Path) -> tuple[int, int]:
    """(d, h) from ``encoder`` [h, d], after checking the decoders agree with it."""
    encoder = sae["encoder"]
    if encoder.dim() != 2:
        raise ValueError(f"{path}: encoder should be the [h, d] concept matrix, got shape "
                         f"{tuple(encoder.shape)}")
    h, d = encoder.shape
    check_shapes(sae, {f"{m}_decoder.{p}": ((d, h) if p == "weight" else (d,))
                       for m in ("vision", "text") for p in ("weight", "bias")},
                 path, f"encoder {tuple(encoder.shape)} (h={h}, d={d})")
    return d, h


def reference_k(sae_path: Path, k: int | None, d: int, h: int) -> int:
    """k from the caller, else from the reference's file-name convention, else 256 with a
    warning: a wrong k changes every code silently. Warns too where the name's expansion
    disagrees with the weights' h / d (a renamed file)."""
    named = REFERENCE_NAME.search(sae_path.name)
    if named:
        expansion = int(named.group(2))
        if h != expansion * d:
            warnings.warn(f"{sae_path.name} says expansion {expansion}, but its weights have "
                          f"h={h} concepts for d={d} (expansion {h / d:g}); was it renamed?",
                          UserWarning, stacklevel=callers_stacklevel())
    if k is not None:
        return k
    if named:
        return int(named.group(1))
    warnings.warn(f"{sae_path.name} does not follow the reference's llava_{{k}}_{{expansion}}_"
                  f"best.pth naming and no k was given: using k={REFERENCE_K}, the released "
                  "spaces' value; pass k=... / --k if this SAE was trained with another",
                  UserWarning, stacklevel=callers_stacklevel())
    return REFERENCE_K


def _default_model_name(model_type: str, sae_path: Path) -> str:
    if model_type == "llava":
        return REFERENCE_LLAVA
    arch = re.match(r"openclip_(.+?)_VL_SAE", sae_path.name)
    return f"open_clip/{arch.group(1)}" if arch else "open_clip"


def load_reference(sae: str | Path, aux: str | Path | None = None, *,
                   model_type: str | None = None, k: int | None = None, layer: int | None = None,
                   n_layers: int = REFERENCE_DEPTH, model_name: str | None = None) -> VLSAESpace:
    """The reference's released SAE (+ auxiliary aligner for LLaVA) as a ``VLSAESpace``.

    Args:
        sae: the SAE ``.pth`` (e.g. ``llava1.5/llava_256_8_best.pth``).
        aux: the auxiliary ``.pt`` (``llava1.5/llava_aux_best.pt``); required for LLaVA.
        model_type: "llava" or "clip"; None infers "llava" when ``aux`` is given, else "clip".
        k: active concepts per row; None reads it from the reference's file name
            (``llava_256_8_best.pth``: 256), else 256 with a warning.
        layer: decoder layer whose input the SAE was trained on (LLaVA only), in
            0..n_layers-1; None places it where the reference did, counted from the end of an
            ``n_layers`` decoder (30 of 32).
        n_layers: decoder depth of the target model.
        model_name: recorded in the config; defaults to llava-hf/llava-1.5-7b-hf for LLaVA and
            the OpenCLIP architecture in the file name for CLIP.

    Example:
        >>> space = load_reference("llava_256_8_best.pth", "llava_aux_best.pt")
        >>> handle = vlsae_hooks.attach(model, space)   # steers the output of layer 30
    """
    sae_path = Path(sae)
    if model_type is None:
        model_type = "llava" if aux is not None else "clip"
    if model_type not in ("llava", "clip"):
        raise ValueError(f"model_type must be 'llava' or 'clip', got {model_type!r}")
    state = read_state_dict(sae_path, "SAE")
    check_keys(state, SAE_KEYS, sae_path, "SAE")
    d, h = _sae_dims(state, sae_path)
    k = reference_k(sae_path, k, d, h)

    aligner_state: dict[str, Tensor] | None = None
    if model_type == "llava":
        if aux is None:
            raise ValueError(f"LLaVA reference weights need their auxiliary alignment file "
                             f"(llava_aux_best.pt beside {sae_path.name}): pass aux=... / --aux; "
                             "the SAE was trained on its projections")
        aux_path = Path(aux)
        aligner_state = read_state_dict(aux_path, "auxiliary")
        check_keys(aligner_state, AUX_KEYS, aux_path, "auxiliary")
        check_shapes(aligner_state, {key: (d, d) if key.endswith("weight") else (d,)
                                     for key in AUX_KEYS},
                     aux_path, f"the SAE {sae_path.name} (d={d})")
        if layer is None:
            layer = reference_layer(n_layers)
        elif not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} is not a layer of a {n_layers}-layer decoder "
                             f"(0..{n_layers - 1}); pass the target model's depth as "
                             "n_layers=... / --n-layers, or a layer inside it")
        site = "layer_input"
    else:
        if aux is not None:
            raise ValueError("an auxiliary file belongs to LLaVA weights; CLIP spaces have none "
                             "(pass model_type='llava' / --model-type llava if this is a LLaVA "
                             "SAE)")
        if d not in OPENCLIP_WIDTHS:
            raise ValueError(f"{sae_path} is a {d}-wide SAE given without an auxiliary file: "
                             f"released OpenCLIP spaces are {OPENCLIP_WIDTHS} wide, LLaVA ones "
                             "need aux=... / --aux. For another CLIP, pass model_type='clip' / "
                             "--model-type clip explicitly")
        if layer is not None:
            raise ValueError("layer applies to LLaVA weights; CLIP spaces read the projected "
                             "embeddings")
        site = "clip_embeds"
    if not 0 < k <= h:
        raise ValueError(f"k={k} must lie in 1..{h} (the SAE has h={h} concepts)")

    config = SpaceConfig(
        kind="vlsae", d_model=d, n_concepts=h, k=k,
        model_name=model_name or _default_model_name(model_type, sae_path),
        model_type=model_type, site=site, layer=layer, has_aligner=aligner_state is not None,
        source="reference",
        extra={"reference_files": {"sae": sae_path.name,
                                   "aux": Path(aux).name if aux is not None else None}})
    with torch.device("meta"):  # no random init of an h x d matrix that is overwritten anyway
        space = VLSAESpace(VLSAE(d, h, k), AuxAligner(d) if aligner_state else None, config)
    ours = {"sae.concepts": state["encoder"],
            **{f"sae.{key}": state[key] for key in SAE_KEYS if key != "encoder"},
            **{f"aligner.{key}": value for key, value in (aligner_state or {}).items()}}
    space.load_state_dict(ours, assign=True)
    return space.eval()


def _clear_out(out: Path, overwrite: bool) -> None:
    """Refuse to write over a space unless asked; asked, remove the old space's files that the
    new one does not replace (readouts, metrics), which would otherwise load with it."""
    if not (out / CONFIG_NAME).is_file():
        return
    if not overwrite:
        raise ValueError(f"{out} already holds a concept space; pass overwrite=True / "
                         "--overwrite to replace it (its readouts and metrics.json are removed "
                         "too), or choose another folder")
    old = SPACE_CLASSES.get(read_config(out).kind, ConceptSpace)
    stale = {*old.HUB_FILES, *VLSAESpace.HUB_FILES, METRICS_NAME} - {*VLSAESpace.REPLACED_FILES}
    for name in sorted(stale):
        (out / name).unlink(missing_ok=True)


def convert_reference(sae: str | Path, out: str | Path, aux: str | Path | None = None, *,
                      overwrite: bool = False, **options) -> VLSAESpace:
    """``load_reference`` once, then save as our safetensors + config.json folder at ``out``.

    ``options`` are ``load_reference``'s keyword arguments. A space already in ``out`` is
    refused unless ``overwrite``; then its readouts and metrics.json go with it. Returns the
    loaded space.
    """
    space = load_reference(sae, aux, **options)
    _clear_out(Path(out), overwrite)
    space.save_pretrained(out)
    return space
