"""The concept-space interface every space implements (VL-SAE now, LexVLA later).

A concept space maps a d_model-wide representation of either modality into a shared sparse
code of ``n_concepts`` entries and back. It is saved as ``model.safetensors`` + ``config.json``
so that the runtime can load it without the training code, and the config records which model
and which site it was trained at, so ``attach`` can refuse or warn on a mismatch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODALITIES = ("vision", "text")
SITES = ("layer_input", "layer_output", "projector_output", "clip_embeds", "pixel_values")


@dataclass
class SpaceConfig:
    """What a saved concept space is and where it belongs."""

    kind: str
    """Space family: "vlsae" | "lexvla"; selects the class that loads it."""
    d_model: int
    """Width of the representation it encodes (the hidden size at its site)."""
    n_concepts: int
    """Number of concepts h."""
    k: int
    """Active concepts per row (top-k)."""
    model_name: str
    """The VLM / CLIP it was trained for (its ``name_or_path``)."""
    model_type: str
    """``config.model_type`` of that model: "llava" | "llava_next" | "qwen2_5_vl" | "clip"."""
    site: str
    """Where the representations were read: "layer_input" | "layer_output" |
    "projector_output" | "clip_embeds" | "pixel_values" (LexVLA: reads the VLM's image input
    and steers its logits)."""
    layer: int | None
    """Decoder layer index for the ``layer_*`` sites, else None."""
    has_aligner: bool
    """Whether an explicit-alignment auxiliary autoencoder sits in front of the SAE."""
    source: str = "vlsae"
    """"vlsae" for spaces trained here, "reference" for converted reference weights."""
    extra: dict = field(default_factory=dict)
    """Free-form metadata (training data, losses, concept labels file, ...)."""

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"SpaceConfig.site must be one of {SITES}, got {self.site!r}")
        if self.site.startswith("layer_") and self.layer is None:
            raise ValueError(f"SpaceConfig.site={self.site!r} needs a decoder layer index")
        if not 0 < self.k <= self.n_concepts:
            raise ValueError(f"SpaceConfig needs 0 < k <= n_concepts, got k={self.k}, "
                             f"n_concepts={self.n_concepts}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SpaceConfig:
        known = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls)
                   if f.name not in data and f.name not in ("source", "extra")]
        if missing:
            raise ValueError(f"concept-space config lacks fields {missing}")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"concept-space config has unknown fields {unknown}")
        return cls(**data)


def read_config(path: str | Path) -> SpaceConfig:
    """Read ``<path>/config.json``; a clear error if the folder is not a saved space."""
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not path.is_dir():
        raise FileNotFoundError(f"no concept space at {str(path)!r}: not a directory")
    if not config_file.is_file():
        raise FileNotFoundError(f"no concept space at {str(path)!r}: {CONFIG_NAME} is missing")
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None
    return SpaceConfig.from_dict(data)


def check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")


class ConceptSpace(nn.Module):
    """Abstract shared vision-language concept space.

    Subclasses set ``kind`` and implement ``encode``/``decode`` and ``_from_config``; saving,
    loading and validation live here so every space is stored the same way.
    """

    kind: ClassVar[str] = ""
    config: SpaceConfig

    def encode(self, x: Tensor, modality: str) -> Tensor:
        """[..., d_model] -> dense [..., n_concepts] with exactly k non-zeros per row."""
        raise NotImplementedError

    def decode(self, z: Tensor, modality: str) -> Tensor:
        """Dense [..., n_concepts] -> [..., d_model] representation of ``modality``."""
        raise NotImplementedError

    def encode_sparse(self, x: Tensor, modality: str) -> tuple[Tensor, Tensor]:
        """(values [..., k], indices [..., k]) of the active concepts; spaces override this
        with a fast path, steering uses it so it never builds dense h-wide codes."""
        return self.encode(x, modality).topk(self.config.k, dim=-1)

    def decode_sparse(self, values: Tensor, indices: Tensor, modality: str) -> Tensor:
        """Decode a sparse code given as (values, indices); repeated indices add up."""
        dense = torch.zeros(*values.shape[:-1], self.config.n_concepts, dtype=values.dtype,
                            device=values.device).scatter_add_(-1, indices, values)
        return self.decode(dense, modality)

    def encode_vision(self, x: Tensor) -> Tensor:
        return self.encode(x, "vision")

    def encode_text(self, x: Tensor) -> Tensor:
        return self.encode(x, "text")

    def decode_vision(self, z: Tensor) -> Tensor:
        return self.decode(z, "vision")

    def decode_text(self, z: Tensor) -> Tensor:
        return self.decode(z, "text")

    @classmethod
    def _from_config(cls, config: SpaceConfig) -> ConceptSpace:
        """An untrained space with the shapes the config describes."""
        raise NotImplementedError

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``<path>/model.safetensors`` and ``<path>/config.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_NAME))
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ConceptSpace:
        """Load a saved space, checking its files, kind and tensor shapes against the config.

        Called on ``ConceptSpace`` itself it loads any kind, like ``load_space``.
        """
        if not cls.kind:
            from vlsae_hooks.spaces import load_space

            return load_space(path)
        path = Path(path)
        config = read_config(path)
        if config.kind != cls.kind:
            raise ValueError(f"{path} holds a {config.kind!r} space, not a {cls.kind!r} space; "
                             "use vlsae_hooks.load_space(path) to load any kind")
        weights_file = path / WEIGHTS_NAME
        if not weights_file.is_file():
            raise FileNotFoundError(f"concept space at {str(path)!r} lacks {WEIGHTS_NAME}")
        space = cls._from_config(config)
        state = load_file(str(weights_file))
        expected = space.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{weights_file} does not match its config "
                             f"(missing {missing}, unexpected {unexpected})")
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(f"{weights_file}: {name} has shape {tuple(tensor.shape)}, "
                                 f"config implies {tuple(expected[name].shape)}")
        space.load_state_dict(state)
        dtype = next(iter(state.values())).dtype
        return space.to(dtype).eval()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
