"""Dataclass configs for extraction, training and the readouts; defaults follow the VL-SAE
reference.

Each field's docstring says what it controls; the CLI exposes every field as a flag of the same
name, so any default can be overridden for quick runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from vlsae_hooks.spaces.config import SITES

SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "no", "bf16", "fp16")
SAVE_DTYPES = ("auto", "float32", "float16", "bfloat16")
LLAVA_PROMPT = "USER: <image>\n{caption} ASSISTANT:"
"""LLaVA-1.5's prompt around a caption, the reference's extraction prompt."""
DESCRIBE_PROMPT = "USER: <image>\nDescribe the image. ASSISTANT:"
"""LLaVA-1.5's prompt around an image alone (patch readouts read the image positions only)."""
DEFAULT_ATTRIBUTE_WORDS = "white,black,blue,red,green,brown,yellow,gray/grey,pink,purple,silver"
"""Colour units read from Visual Genome's attributes ('/' joins a unit's synonyms). Not
"orange": it is also a COCO category, and a token spells one unit."""


def _finite(config: object) -> None:
    """Refuse NaN and inf in every float field: NaN passes each range check (``nan <= 0`` is
    False), so it would train an all-NaN space and exit 0."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{type(config).__name__}.{f.name} must be a finite number, got "
                             f"{value}")


def _positive(owner: str, **values: float | int | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ValueError(f"{owner}.{name} must be positive, got {value}")


def _choice(owner: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name} must be one of {allowed}, got {value!r}")


@dataclass
class ExtractConfig:
    """Where to read image-caption pairs, which model and site, where to write activations."""

    model: str
    """Folder or hub name of a llava-hf LLaVA (or LLaVA-NeXT / Qwen2.5-VL) or a CLIPModel."""
    data: str
    """Image-caption pairs: webdataset shards (folder, brace pattern), a .tsv/.csv, a .parquet
    or ``save_to_disk`` folder, or ``hf:NAME``."""
    out: str
    """Output folder: one safetensors shard per data part + ``manifest.json`` + ``extract.log``."""
    site: str | None = None
    """"layer_input" | "layer_output" | "projector_output" (LLaVA) or "clip_embeds" (CLIP);
    None: layer_input for VLMs (the reference's training site), clip_embeds for CLIP."""
    layer: int | None = None
    """Decoder layer for the layer sites; None: round(30 * n_layers / 32), the reference's
    layer 30 of 32 scaled to the model's depth."""
    prompt: str = LLAVA_PROMPT
    """Prompt around each caption (LLaVA); "chat" uses the processor's chat template instead."""
    batch_size: int = 16
    """Pairs per forward pass (left-padded, attention mask respected)."""
    rows_per_part: int = 10_000
    """Rows per output shard for table / datasets sources (webdataset: one shard per tar)."""
    max_samples: int | None = None
    """Stop after this many pairs per process (quick runs); None: everything."""
    dtype: str = "auto"
    """Model dtype: "auto" = bfloat16 on GPU, float32 on CPU; or float32 / float16 / bfloat16."""
    save_dtype: str = "auto"
    """Stored activation dtype: "auto" = the activations' own dtype."""
    load_in_4bit: bool = False
    """Load the model with bitsandbytes 4-bit weights (NF4)."""
    caption_column: str | None = None
    """Caption column of a table / datasets source (None: caption, text or txt)."""
    image_column: str | None = None
    """Image column of a table / datasets source (None: image, jpg, img, image_path, ...)."""
    codes_of: str | None = None
    """A trained VL-SAE space folder: store, per pair, the element-wise max of its codes over
    the image positions and over the caption positions (h wide) instead of the mean states,
    at the space's own site. ``sae_training readout`` fits a ``pool="max"`` readout on them.
    Rows are h wide (h = 32768: 128 KB a pair in float32; ``--save-dtype bfloat16`` halves
    it, and a readout needs a few hundred thousand pairs at most: ``--max-samples``)."""
    scores: bool = False
    """With ``codes_of``: store the max over the positions of every concept's dense score (the
    cosine the top-k is taken on) instead of the max of the top-k codes. A phrase readout
    (``readout --phrases``) reads these: they keep which shape a patch shows, which its k
    winners mostly drop."""

    def __post_init__(self) -> None:
        _finite(self)
        if self.site is not None:
            _choice("ExtractConfig", "site", self.site, SITES)
        _positive("ExtractConfig", batch_size=self.batch_size, rows_per_part=self.rows_per_part,
                  max_samples=self.max_samples)
        _choice("ExtractConfig", "save_dtype", self.save_dtype, SAVE_DTYPES)
        _choice("ExtractConfig", "dtype", self.dtype, SAVE_DTYPES)
        if self.prompt != "chat" and ("{caption}" not in self.prompt or "<image>" not in
                                      self.prompt):
            raise ValueError("ExtractConfig.prompt needs '<image>' and '{caption}' (or 'chat')")


@dataclass
class AlignerConfig:
    """The explicit-alignment auxiliary autoencoder (stage 1, LLaVA sites only)."""

    epochs: int = 50
    """Passes over the training pairs."""
    batch_size: int = 2048
    """Pairs per step (InfoNCE negatives come from the batch)."""
    lr: float = 5e-5
    """AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    temperature: float = 0.07
    """InfoNCE temperature."""
    normalize: bool = False
    """InfoNCE on cosines instead of the reference's raw dot products. Raw dot products leave
    each modality's mean offset in place, and the SAE's encoder compares directions, so matched
    images and captions can still land on disjoint concepts; cosines align the directions."""
    pair_weight: float = 0.0
    """Weight of an extra MSE between the two projections of a matched pair (0 = reference).
    Pulls an image and its caption to the same point, so they select the same concepts."""
    warmup_epochs: float = 0.0
    """Linear warm-up length before the schedule."""
    schedule: str = "cosine"
    """"cosine" (decay to 0 over training) or "constant"."""

    def __post_init__(self) -> None:
        _finite(self)
        if self.pair_weight < 0:
            raise ValueError(f"AlignerConfig.pair_weight must be >= 0, got {self.pair_weight}")
        _positive("AlignerConfig", epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                  temperature=self.temperature)
        _choice("AlignerConfig", "schedule", self.schedule, SCHEDULES)


@dataclass
class SAEConfig:
    """The VL-SAE (stage 2) and its dead-concept revival."""

    expansion: int = 8
    """Concepts per input dimension: h = expansion * d."""
    k: int = 256
    """Active concepts per representation (top-k)."""
    epochs: int = 10
    """Passes over the training pairs."""
    batch_size: int = 512
    """Pairs per step (each pair is one vision and one text row)."""
    lr: float = 1e-4
    """Adam learning rate (the reference uses 1e-3 for CLIP)."""
    warmup_epochs: float = 2.0
    """Linear warm-up length before the schedule."""
    schedule: str = "cosine"
    """"cosine" (decay to 0 over training) or "constant"."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss (OpenAI top-k SAE paper): the top ``k_aux`` dead concepts
    reconstruct the residual x - x_hat; 0 turns revival off."""
    k_aux: int | None = None
    """Dead concepts used by AuxK; None: d // 2."""
    resample_epochs: float = 1.0
    """Every this many epochs (not in the last one), point each dead concept at a training pair
    the SAE reconstructs worst and reset its optimizer state; 0 turns resampling off."""
    dead_after: int | None = None
    """A concept is dead once it has not fired on this many training pairs (either modality);
    None: one epoch, at most 10M."""

    def __post_init__(self) -> None:
        _finite(self)
        _positive("SAEConfig", expansion=self.expansion, k=self.k, epochs=self.epochs,
                  batch_size=self.batch_size, lr=self.lr, k_aux=self.k_aux,
                  dead_after=self.dead_after)
        if min(self.auxk_coef, self.warmup_epochs, self.resample_epochs) < 0:
            raise ValueError("SAEConfig.auxk_coef, warmup_epochs and resample_epochs must be "
                             ">= 0")
        _choice("SAEConfig", "schedule", self.schedule, SCHEDULES)


@dataclass
class TrainConfig:
    """One training run: activations in, a saved ``VLSAESpace`` + metrics out."""

    data: str
    """Extraction folder (with ``manifest.json``)."""
    out: str
    """Run folder: ``space/``, ``metrics.json``, ``train_log.jsonl``, ``train.log``, checkpoints."""
    sae: SAEConfig = field(default_factory=SAEConfig)
    """The concept space and its optimisation."""
    aligner: AlignerConfig = field(default_factory=AlignerConfig)
    """The auxiliary aligner and its optimisation."""
    use_aligner: bool | None = None
    """Train the aligner first; None: yes for LLaVA sites, no for CLIP (already aligned)."""
    max_samples: int | None = None
    """Use only the first this many extracted pairs."""
    val_fraction: float = 0.05
    """Share of pairs held out for the final metrics (at most ``max_val_samples``)."""
    max_val_samples: int = 50_000
    """Cap on held-out pairs."""
    seed: int = 0
    """Seeds initialisation, the train/val split and every epoch's shuffle."""
    checkpoint_every: int = 500
    """Optimizer steps between checkpoints (also written at the end of each stage)."""
    log_every: int = 50
    """Optimizer steps between log lines / ``train_log.jsonl`` records."""
    mixed_precision: str = "auto"
    """accelerate mixed precision: "auto" = bf16 on GPU, no on CPU; or no / bf16 / fp16."""
    resume: bool = True
    """Continue from ``out/checkpoint.pt`` (and a finished ``aligner.safetensors``) if present."""

    def __post_init__(self) -> None:
        _finite(self)
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"TrainConfig.val_fraction must be in (0, 1), got {self.val_fraction}")
        _positive("TrainConfig", max_samples=self.max_samples,
                  checkpoint_every=self.checkpoint_every, log_every=self.log_every,
                  max_val_samples=self.max_val_samples)
        _choice("TrainConfig", "mixed_precision", self.mixed_precision, PRECISIONS)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReadoutConfig:
    """Fit a space's word readout (concepts -> caption words) for ``mode="evidence"`` steering."""

    space: str
    """A trained space folder; ``word_readout.safetensors`` (+ ``word_readout.json``) is written
    into it."""
    data: str
    """The extraction folder the space was trained on (vision rows + their captions), or an
    extraction of its pooled codes (``extract --codes-of SPACE``) for a ``pool="max"`` readout."""
    tokenizer: str
    """The steered model (or its tokenizer) folder / hub name: words become its token ids."""
    max_tokens: int = 4096
    """Caption tokens read out at most (the most frequent ones that pass the filters)."""
    min_count: int = 20
    """Captions a token must appear in to be read out."""
    max_doc_freq: float = 0.5
    """Tokens in more than this share of captions ("a", "the", "image") are never steered."""
    epochs: int = 30
    batch_size: int = 512
    lr: float = 1e-2
    l2: float = 1e-4
    """Penalty on the mean squared weight (keeps rare concepts from overclaiming)."""
    val_fraction: float = 0.05
    """Held-out captions for the reported AUC and for ``min_auc``."""
    min_auc: float = 0.6
    """Keep only tokens whose held-out AUC reaches this: words the images do not predict
    ("there", "image" in caption templates) would only add noise to the evidence, and to
    ``affirm``'s sum over the words a question asks about. 0 keeps every token."""
    max_samples: int | None = 200_000
    """Use only the first this many extracted pairs: a readout of a few thousand words learns
    from a few hundred thousand captions, and their codes are held in memory (12 k bytes each)."""
    phrases: bool = False
    """Fit the phrase readout (adjacent caption token pairs, ``phrase_readout.safetensors``)
    instead of the word readout; ``--data`` then holds pooled scores or codes
    (``extract --codes-of SPACE --scores``), for ``attach(..., phrase_strength=...)``."""
    phrase_of_words: bool = True
    """With ``phrases``: keep only phrases both of whose tokens the space's word readout reads
    (content words such as "red" and "star", not "there is"), so fit the word readout first."""
    seed: int = 0

    def __post_init__(self) -> None:
        _finite(self)
        _positive("ReadoutConfig", max_tokens=self.max_tokens, min_count=self.min_count,
                  epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                  max_samples=self.max_samples)
        for name in ("max_doc_freq", "val_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"ReadoutConfig.{name} must be in (0, 1), "
                                 f"got {getattr(self, name)}")
        if self.l2 < 0:
            raise ValueError(f"ReadoutConfig.l2 must be >= 0, got {self.l2}")
        if not 0 <= self.min_auc < 1:
            raise ValueError(f"ReadoutConfig.min_auc must be in [0, 1), got {self.min_auc}")


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
        _positive("PatchReadoutConfig", steps=self.steps, lr=self.lr, batch_size=self.batch_size)
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
        _finite(self)
        _positive("PatchReadoutRunConfig", limit=self.limit,
                  extract_batch_size=self.extract_batch_size, chunk_images=self.chunk_images)
        if isinstance(self.layer, bool) or self.layer < 0:
            raise ValueError(f"PatchReadoutRunConfig.layer must be a decoder layer index >= 0, "
                             f"got {self.layer}")
        if not 0 < self.heldout < 1:
            raise ValueError(f"PatchReadoutRunConfig.heldout must be in (0, 1), "
                             f"got {self.heldout}")
        _choice("PatchReadoutRunConfig", "dtype", self.dtype, SAVE_DTYPES)
        if (self.attributes is None) != (self.vg_images is None):
            raise ValueError("PatchReadoutRunConfig.attributes (Visual Genome attributes.json) "
                             "and vg_images (its image_data.json) go together")
        if self.prompt != "chat" and "<image>" not in self.prompt:
            raise ValueError("PatchReadoutRunConfig.prompt needs '<image>' (or 'chat')")
