"""Dataclass configs of mode grounding's patch readouts: the fit (``PatchReadoutConfig``) and a
real LLaVA-1.5's run from COCO-format boxes (``PatchReadoutRunConfig``, the ``patch-readout``
command). Each field's docstring says what it controls; the CLI exposes every field as a flag."""

from __future__ import annotations

from dataclasses import dataclass, field

from sae_training.config import SAVE_DTYPES, check_choice, check_finite, check_positive

DESCRIBE_PROMPT = "USER: <image>\nDescribe the image. ASSISTANT:"
"""LLaVA-1.5's prompt around an image alone (patch readouts read the image positions only)."""
DEFAULT_ATTRIBUTE_WORDS = "white,black,blue,red,green,brown,yellow,gray/grey,pink,purple,silver"
"""Colour units read from Visual Genome's attributes ('/' joins a unit's synonyms). Not
"orange": it is also a COCO category, and a token spells one unit."""


@dataclass
class PatchReadoutConfig:
    """How a patch readout is fitted (the toy world's readouts: these defaults)."""

    steps: int = 400
    """Adam steps, each on ``batch_size`` images (all their patches)."""
    lr: float = 3e-2
    """Adam's learning rate."""
    weight_decay: float = 1e-4
    """Adam's L2 penalty on weight and bias: keeps rare units from overclaiming."""
    batch_size: int = 512
    """Images per step (drawn with replacement)."""
    seed: int = 0
    """Seed of the draws: the same data and seed give the same readout."""
    min_cover: float = 0.25
    """Share of a patch a region must cover for the patch to show the region's units."""

    def __post_init__(self) -> None:
        check_finite(self)
        check_positive("PatchReadoutConfig", steps=self.steps, lr=self.lr,
                       batch_size=self.batch_size)
        if self.weight_decay < 0:
            raise ValueError(f"PatchReadoutConfig.weight_decay must be >= 0, "
                             f"got {self.weight_decay}")
        if not 0 < self.min_cover <= 1:
            raise ValueError(f"PatchReadoutConfig.min_cover must be in (0, 1], "
                             f"got {self.min_cover}")


@dataclass
class PatchReadoutRunConfig:
    """Fit mode grounding's patch readout for a real LLaVA-1.5 from COCO-format boxes: each
    image's boxes become per-patch targets in the frame the vision tower sees, its image
    positions' states at the input of decoder layer ``layer`` are extracted (cached per chunk: a
    killed run resumes), and the fitted readout is written with its held-out AUCs."""

    model: str
    """Folder or hub name of the llava-hf LLaVA-1.5 the readout is for (the model it steers)."""
    boxes: str
    """COCO-format instances json (COCO 2017: annotations/instances_train2017.json); its
    categories are the object units."""
    images: str
    """Folder holding the images the json names by ``file_name`` (COCO 2017: train2017/)."""
    space: str
    """Output folder: patch_readout.safetensors, patch_readout.json (settings, units, held-out
    AUCs) and patch_readout.log go into it. A space folder: attach(model, SPACE,
    mode="grounding") then finds the readout; any other folder: pass it as readout=."""
    layer: int = 0
    """Decoder layer whose input's image positions are read; 0: the projector's output in place
    (only the vision tower and the projector run)."""
    limit: int | None = None
    """Use the first N images that have a box (by image id); None: every one."""
    exclude: str | None = None
    """A COCO json whose images are left out, by id (any json with "images"). POPE's and CHAIR's
    COCO images are val2014's, and train2017 holds most of them: with train2017 pass
    annotations/instances_val2014.json here, so the readout never sees an evaluated image."""
    heldout: float = 0.05
    """Share of the images (the last ones, by image id) held out of the fit for the AUCs."""
    captions_only: bool = False
    """Fit from image-level labels only (multiple-instance learning: the units an image's boxes
    name, as a caption naming every annotated object would), not from where the boxes lie."""
    synonyms: str | None = None
    """More spellings of the object units: CHAIR's synonyms.txt (a category, then its
    synonyms, per line) or a json {category: [words]}."""
    attributes: str | None = None
    """Visual Genome attributes.json: adds attribute units (``attribute_words``) from its
    attribute boxes, and keeps only the COCO images Visual Genome also annotates."""
    vg_images: str | None = None
    """Visual Genome image_data.json (each image's size and coco_id), with ``attributes``."""
    attribute_words: str = DEFAULT_ATTRIBUTE_WORDS
    """With ``attributes``: the attribute units, comma-separated, a unit's synonyms joined by
    '/'."""
    prompt: str = DESCRIBE_PROMPT
    """Prompt around the image ("chat": the processor's chat template); only its tokens before
    the image reach the image positions, and none does at layer 0."""
    extract_batch_size: int = 16
    """Images per forward pass of the extraction."""
    chunk_images: int = 256
    """Images per cached chunk of states: a killed run redoes at most one chunk."""
    cache: str | None = None
    """Folder of the extracted states (a safetensors file per chunk); None: SPACE.patch_states
    beside the output folder. Kept after the fit, so a refit with other fit settings skips the
    extraction; delete it when done (LLaVA-1.5-7B: 4.7 MB an image in bfloat16)."""
    device: str = "auto"
    """Where the model runs and the fit too, if its states fit there: "auto" = cuda if
    available, else cpu."""
    dtype: str = "auto"
    """Model dtype, and the cached states': "auto" = bfloat16 on GPU, float32 on CPU; or
    float32 / float16 / bfloat16."""
    fit: PatchReadoutConfig = field(default_factory=PatchReadoutConfig,
                                    metadata={"flatten": True})
    """The fit; its flags carry no prefix (--steps, --lr, --batch-size, --min-cover, ...)."""

    def __post_init__(self) -> None:
        check_finite(self)
        check_positive("PatchReadoutRunConfig", limit=self.limit,
                       extract_batch_size=self.extract_batch_size, chunk_images=self.chunk_images)
        if isinstance(self.layer, bool) or self.layer < 0:
            raise ValueError(f"PatchReadoutRunConfig.layer must be a decoder layer index >= 0, "
                             f"got {self.layer}")
        if not 0 < self.heldout < 1:
            raise ValueError(f"PatchReadoutRunConfig.heldout must be in (0, 1), "
                             f"got {self.heldout}")
        check_choice("PatchReadoutRunConfig", "dtype", self.dtype, SAVE_DTYPES)
        if (self.attributes is None) != (self.vg_images is None):
            raise ValueError("PatchReadoutRunConfig.attributes (Visual Genome attributes.json) "
                             "and vg_images (its image_data.json) go together")
        if self.prompt != "chat" and "<image>" not in self.prompt:
            raise ValueError("PatchReadoutRunConfig.prompt needs '<image>' (or 'chat')")
