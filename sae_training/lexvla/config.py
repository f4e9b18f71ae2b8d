"""Dataclass configs of a LexVLA model and of one training run.

Defaults are the paper's setting (DINOv2 + Llama-2, in-context one-word prediction, vocabulary
pruned to meaningful words, 1/sqrt(V) inference sparsity); ``sae_training.lexvla.toy`` holds
the scaled-down toy-world recipe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from sae_training.config import check_finite

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class LexVLAConfig:
    """What a LexVLA model is made of; saved as ``lexvla.json`` beside its weights."""

    text_model: str
    """A Llama-family causal LM (folder or hub id), or a llava-hf folder whose language model
    is used. A relative path that exists beside a saved model is resolved against it."""
    backbone: str | None = None
    """A ``Dinov2Model`` folder or hub id; None: a randomly initialised one from
    ``backbone_config`` (the toy world)."""
    backbone_config: dict | None = None
    """``Dinov2Config`` fields for a backbone built from scratch."""
    freeze_backbone: bool = True
    """Keep DINOv2 frozen (the paper). Random toy backbones give weak frozen features: the toy
    recipe trains it (``--unfreeze-backbone``)."""
    prompt: str = "{caption} This text means in one word:"
    """In-context lexical prediction: the LM's prediction after the last token of this prompt,
    read over the kept words, is the caption's lexical vector."""
    vocabulary: list[str] | None = None
    """Words to keep, as the text tokenizer's token strings; None: the pruning rule below."""
    min_word_length: int = 2
    """Pruning rule: keep alphabetic tokens at least this long (word-start pieces only when the
    tokenizer marks word starts, "▁"/"Ġ"), minus ``stopwords``."""
    stopwords: list[str] | None = None
    """Lower-case words to drop; None: ``vocabulary.STOPWORDS``."""
    phrases: list[str] | None = None
    """Multi-word lexical units ("red star"), each a space-separated run of tokenizer tokens,
    after the words: what one patch shows may need two words bound together. Each gets a vision
    and a text codebook row, both initialised to the mean LM-head row of its tokens; the LM
    head has no row for a phrase, so its text row is trained (the words' rows stay frozen)."""
    image_size: int = 224
    """Side the images are resized to before the backbone."""
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    adapter_heads: int = 8
    """Heads of the adapter's self-attention block (must divide the backbone width)."""
    adapter_hidden: int = 2048
    """Hidden width of the adapter's 2-layer MLP mapper."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Modules of the LM that get LoRA (the LM head never does: it is the text codebook)."""
    max_active: int = 256
    """Cap on active words ``encode_sparse`` returns (the space's k); clipped to V."""

    def __post_init__(self) -> None:
        if "{caption}" not in self.prompt:
            raise ValueError("LexVLAConfig.prompt needs a '{caption}' slot")
        if self.backbone is None and not self.backbone_config:
            raise ValueError("LexVLAConfig needs a backbone path or a backbone_config")
        if min(self.min_word_length, self.lora_r, self.max_active, self.image_size) <= 0:
            raise ValueError("LexVLAConfig sizes must be positive")
        self.pixel_mean, self.pixel_std = tuple(self.pixel_mean), tuple(self.pixel_std)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LexVLAConfig:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"lexvla.json has unknown fields {unknown}")
        return cls(**data)


@dataclass
class LexVLATrainConfig:
    """One run: image-caption pairs in, a saved LexVLA model (+ its concept space) out."""

    data: str
    """Pairs: webdataset shards, a .tsv/.csv, a .parquet / ``save_to_disk`` folder or ``hf:NAME``
    (the VL-SAE readers)."""
    out: str
    """Run folder: ``model/``, ``train_log.jsonl``, ``train.log``, ``checkpoint.pt`` (and
    ``checkpoint.prev.pt``)."""
    model: LexVLAConfig
    vlm: str | None = None
    """The VLM whose tokenizer the saved space's words are mapped onto and whose processor's
    pixel normalisation steering reads; None: ``model.text_model``."""
    steps: int = 10_000
    """Optimizer steps."""
    batch_size: int = 256
    """Pairs per step, over all processes (InfoNCE negatives come from the whole batch)."""
    lr: float = 1e-4
    """AdamW learning rate of the adapter and the vision codebook."""
    lora_lr: float = 1e-4
    """AdamW learning rate of the LoRA weights."""
    backbone_lr: float = 1e-4
    """Learning rate of the backbone when it is not frozen."""
    weight_decay: float = 0.01
    temperature: float = 0.05
    """InfoNCE temperature on the cosines of the unit lexical vectors."""
    overuse_weight: float = 0.1
    """Weight of the overuse penalty (on both modalities)."""
    caption_word_weight: float = 0.0
    """Weight of an extra cross-entropy pulling both modalities' word distributions (softmax
    of the raw scores) towards the caption's own kept words. 0 = the paper's objective, which
    relies on a pretrained LM that already predicts meaningful words; a small LM trained along
    (the toy) needs it, or both sides agree on words used as arbitrary codes."""
    presence_weight: float = 0.0
    """Weight of a caption-level multiple-instance loss: binary cross-entropy of every unit's
    score (image: its max over patches; caption: its score) against whether the caption holds
    the unit. Absent units are pushed down on every patch and present ones up on one, so the
    patch-level words get a signal from captions alone (no boxes). 0 = the paper."""
    warmup_steps: int = 200
    seed: int = 0
    shuffle_buffer: int = 2048
    """Samples held for shuffling inside a data part (parts are shuffled per epoch too)."""
    max_samples: int | None = None
    """Read only the first this many pairs (quick runs)."""
    checkpoint_every: int = 500
    log_every: int = 50
    mixed_precision: str = "auto"
    """accelerate mixed precision: "auto" = bf16 on GPU, no on CPU; or no / bf16 / fp16."""
    resume: bool = True
    """Continue from ``out/checkpoint.pt`` if present (same config required)."""

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = LexVLAConfig.from_dict(self.model)
        check_finite(self)  # nan passes every range check below
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "shuffle_buffer"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LexVLATrainConfig.{name} must be positive")
        if self.max_samples is not None and self.max_samples <= 0:
            raise ValueError(f"LexVLATrainConfig.max_samples must be None or positive, got "
                             f"{self.max_samples}")
        if min(self.lr, self.lora_lr, self.backbone_lr, self.temperature) <= 0:
            raise ValueError("learning rates and temperature must be positive")
        if min(self.overuse_weight, self.caption_word_weight, self.presence_weight,
               self.warmup_steps) < 0:
            raise ValueError("overuse_weight, caption_word_weight, presence_weight and "
                             "warmup_steps must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)
