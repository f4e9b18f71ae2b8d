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


def check_finite(config: object) -> None:
    """Refuse NaN and inf in every float field: NaN passes each range check (``nan <= 0`` is
    False), so it would train an all-NaN space and exit 0."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{type(config).__name__}.{f.name} must be a finite number, got "
                             f"{value}")


def check_positive(owner: str, **values: float | int | None) -> None:
    """Refuse a value <= 0 (None: unset, allowed), naming ``owner.field``."""
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ValueError(f"{owner}.{name} must be positive, got {value}")


def check_choice(owner: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Refuse a value outside ``allowed``, naming ``owner.name`` and the choices."""
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
        check_finite(self)
        if self.site is not None:
            check_choice("ExtractConfig", "site", self.site, SITES)
        check_positive("ExtractConfig", batch_size=self.batch_size,
                       rows_per_part=self.rows_per_part, max_samples=self.max_samples)
        check_choice("ExtractConfig", "save_dtype", self.save_dtype, SAVE_DTYPES)
        check_choice("ExtractConfig", "dtype", self.dtype, SAVE_DTYPES)
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
        check_finite(self)
        if self.pair_weight < 0:
            raise ValueError(f"AlignerConfig.pair_weight must be >= 0, got {self.pair_weight}")
        check_positive("AlignerConfig", epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                       temperature=self.temperature)
        check_choice("AlignerConfig", "schedule", self.schedule, SCHEDULES)


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
        check_finite(self)
        check_positive("SAEConfig", expansion=self.expansion, k=self.k, epochs=self.epochs,
                       batch_size=self.batch_size, lr=self.lr, k_aux=self.k_aux,
                       dead_after=self.dead_after)
        if min(self.auxk_coef, self.warmup_epochs, self.resample_epochs) < 0:
            raise ValueError("SAEConfig.auxk_coef, warmup_epochs and resample_epochs must be "
                             ">= 0")
        check_choice("SAEConfig", "schedule", self.schedule, SCHEDULES)


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
        check_finite(self)
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"TrainConfig.val_fraction must be in (0, 1), got {self.val_fraction}")
        check_positive("TrainConfig", max_samples=self.max_samples,
                       checkpoint_every=self.checkpoint_every, log_every=self.log_every,
                       max_val_samples=self.max_val_samples)
        check_choice("TrainConfig", "mixed_precision", self.mixed_precision, PRECISIONS)

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
        check_finite(self)
        check_positive("ReadoutConfig", max_tokens=self.max_tokens, min_count=self.min_count,
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
