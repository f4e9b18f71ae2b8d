"""Where a layer-site mode steers: the decoder layer (``resolve_site``), whether the space fits
the model at all (``check_space_fits``), and the space placed on that layer's device."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from vlsae_hooks.adapters import ModelAdapter
from vlsae_hooks.caller_line import callers_stacklevel
from vlsae_hooks.registry import model_names
from vlsae_hooks.spaces import ConceptSpace, SpaceConfig

if TYPE_CHECKING:
    from vlsae_hooks.modes.options import LayerSiteOptions


def trained_input_layer(config: SpaceConfig) -> int:
    """The decoder layer whose input holds the states a layer-site space was trained on (a
    layer's output is the next layer's input)."""
    return config.layer + (config.site == "layer_output")


def resolve_site(space: ConceptSpace, options: LayerSiteOptions, n_layers: int) -> int:
    """Index of the decoder layer whose input is steered; warns if it is not where the space
    was trained (or, for reference weights, where the reference steers)."""
    config = space.config
    if not config.site.startswith("layer_"):
        raise ValueError(f"the space was trained on {config.site!r}, not on decoder-layer "
                         "states; decode-time steering needs a layer_input/layer_output space")
    trained = trained_input_layer(config)
    default = trained + (config.source == "reference")
    if options.layer is None:
        site = default
    else:
        layer = options.layer + n_layers if options.layer < 0 else options.layer
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {options.layer} out of range for {n_layers} decoder layers")
        site = layer + (options.site != "input")
    if site >= n_layers:
        raise ValueError(f"cannot steer the output of the last decoder layer ({n_layers - 1}): "
                         "only the final norm reads it; pick an earlier layer")
    if site != default:
        warnings.warn(f"steering at the input of decoder layer {site}, but the space was trained "
                      f"at the input of layer {trained}"
                      + (" (the reference steers one layer later)" if default != trained else ""),
                      UserWarning, stacklevel=callers_stacklevel())
    return site


def check_space_fits(model: nn.Module, adapter: ModelAdapter, space: ConceptSpace) -> None:
    """Errors for a space that cannot work on this model, warnings for one made for another."""
    config, width = space.config, adapter.hidden_size(model)
    if config.d_model != width:
        raise ValueError(f"the concept space encodes {config.d_model}-wide states but the "
                         f"model's decoder layers are {width} wide: it was trained for "
                         f"{config.model_name!r}, not this model")
    if config.model_type != model.config.model_type:
        warnings.warn(f"the concept space was trained for a {config.model_type!r} model "
                      f"({config.model_name!r}), this is a {model.config.model_type!r} model",
                      UserWarning, stacklevel=callers_stacklevel())
        return
    basenames = {Path(name).name for name in model_names(model)}
    if basenames and Path(config.model_name).name not in basenames:
        warnings.warn(f"the concept space was trained for {config.model_name!r}, this model was "
                      f"loaded as {sorted(model_names(model))}", UserWarning,
                      stacklevel=callers_stacklevel())


def placed_space(space: ConceptSpace, device: torch.device) -> ConceptSpace:
    """``space`` (and its readouts) on ``device`` in eval mode. A space that is not there yet is
    copied, never moved: the caller's object stays as it was (moving it in place onto an
    offloaded layer's device once left it on "meta", unusable)."""
    readouts = [r for r in (getattr(space, "word_readout", None),
                            getattr(space, "phrase_readout", None)) if r is not None]
    tensors = [*space.parameters(), *space.buffers(), *(r.weight for r in readouts)]
    if not space.training and all(t.device == device for t in tensors):
        return space
    return copy.deepcopy(space).to(device).eval()  # a VLSAESpace's .to moves its readouts too
