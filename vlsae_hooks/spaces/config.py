"""What a saved concept space is and where it belongs: ``SpaceConfig`` (its ``config.json``),
the sites a space can be trained at and the two modalities it encodes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

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
        for name in ("kind", "model_name", "model_type", "site", "source"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"SpaceConfig.{name} must be a string, got "
                                 f"{getattr(self, name)!r}")
        for name in ("d_model", "n_concepts", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SpaceConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.has_aligner, bool):
            raise ValueError(f"SpaceConfig.has_aligner must be true or false, got "
                             f"{self.has_aligner!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"SpaceConfig.extra must be a mapping, got {self.extra!r}")
        if self.site not in SITES:
            raise ValueError(f"SpaceConfig.site must be one of {SITES}, got {self.site!r}")
        if self.site.startswith("layer_") and self.layer is None:
            raise ValueError(f"SpaceConfig.site={self.site!r} needs a decoder layer index")
        if self.layer is not None and (isinstance(self.layer, bool)
                                       or not isinstance(self.layer, int) or self.layer < 0):
            raise ValueError(f"SpaceConfig.layer must be a decoder layer index >= 0, counted "
                             f"from the first layer (the last of 32 is 31), got {self.layer!r}")
        if not 0 < self.k <= self.n_concepts:
            raise ValueError(f"SpaceConfig needs 0 < k <= n_concepts, got k={self.k}, "
                             f"n_concepts={self.n_concepts}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SpaceConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a concept-space config is a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls)
                   if f.name not in data and f.name not in ("source", "extra")]
        if missing:
            raise ValueError(f"concept-space config lacks fields {missing}")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"concept-space config has unknown fields {unknown}")
        return cls(**data)


def check_modality(modality: str) -> None:
    """A clear error for a modality other than "vision" or "text"."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
