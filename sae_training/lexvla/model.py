"""The trainable LexVLA: the runtime's vision side (``LexVLASpace``) plus the LoRA-tuned text LM.

Saved as one folder: ``config.json`` + ``model.safetensors`` (the concept space, loadable by
``vlsae_hooks.load_space`` without this package), ``text_lora/`` (the PEFT adapter) and
``lexvla.json`` (the ``LexVLAConfig``, the kept words' ids in the text tokenizer and each
phrase unit's token ids). The space's units are the words, then the phrases.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Dinov2Config,
    Dinov2Model,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from sae_training.lexvla.config import LexVLAConfig
from sae_training.lexvla.vocabulary import (
    contains_run,
    leading_space,
    phrase_token_ids,
    prune_vocabulary,
)
from vlsae_hooks.spaces import SpaceConfig
from vlsae_hooks.spaces.lexvla import LexVLASpace, drop_below, lexical_activation
from vlsae_hooks.tensor_files import as_umask_allows

META_NAME = "lexvla.json"
LORA_DIR = "text_lora"
_VLM_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                 ("model.language_model.", "model."), ("lm_head.", "lm_head."))


def load_text_model(name: str) -> PreTrainedModel:
    """A causal LM from a folder / hub id, or the language model inside a local VLM folder."""
    config = AutoConfig.from_pretrained(name)
    text_config = config.get_text_config()
    if text_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{name!r} is a {config.model_type!r} model, whose text side is no "
                         "causal LM: give a Llama-family LM (hub id or folder) or a local "
                         "llava-hf folder")
    if text_config is config:
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    if not Path(name).is_dir():
        raise ValueError(f"{name!r} is a VLM: give a local folder (its language model is read "
                         "from its safetensors) or the LM itself")
    model = AutoModelForCausalLM.from_config(text_config)
    state = {}
    for file in sorted(Path(name).glob("*.safetensors")):
        for key, tensor in load_file(str(file)).items():
            for prefix, target in _VLM_PREFIXES:
                if key.startswith(prefix):
                    state[target + key[len(prefix):]] = tensor
                    break
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{name}: language-model weights do not fit (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return model.float()


def load_tokenizer(name: str):
    tokenizer = AutoTokenizer.from_pretrained(name)
    tokenizer.padding_side = "left"  # the prompt's last token sits at position -1 in every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def vlm_pixel_normalisation(vlm: str, fallback: tuple) -> tuple[list[float], list[float]]:
    """(mean, std) the VLM's image processor applies; ``fallback`` when it has none."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(vlm)
    except (OSError, ValueError):
        return list(fallback[0]), list(fallback[1])
    return list(processor.image_mean), list(processor.image_std)


def images_to_tensor(images: list[Image.Image], size: int) -> Tensor:
    """PIL images -> [B, 3, size, size] floats in [0, 1] (bicubic resize)."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def resolve_beside(folder: Path, name: str) -> str:
    """``name`` relative to ``folder`` when that exists, else as given (a path or hub id)."""
    candidate = folder / name
    return str(candidate.resolve()) if not Path(name).is_absolute() and candidate.exists() else name


class LexVLA(nn.Module):
    """Image and caption -> unit lexical vectors over the kept words and phrases (dense while
    training). The words' text codebook rows are the frozen LM head; the phrases' text rows are
    the trainable ``phrase_text`` (copied into the space's codebook when saved)."""

    def __init__(self, config: LexVLAConfig, space: LexVLASpace, text_lm: nn.Module, tokenizer,
                 word_ids: list[int], phrase_ids: list[list[int]] | None = None) -> None:
        super().__init__()
        self.config, self.space, self.text_lm, self.tokenizer = config, space, text_lm, tokenizer
        self.word_ids = list(word_ids)
        self.phrase_ids = [list(ids) for ids in phrase_ids or []]
        self.lead = leading_space(tokenizer)
        """Put before a caption whose words are counted, so that its first word is written as
        every other (``leading_space``)."""
        if len(self.word_ids) + len(self.phrase_ids) != space.config.n_concepts:
            raise ValueError("words + phrases do not match the space's units")
        self.phrase_text = nn.Parameter(space.text_codebook[len(self.word_ids):].clone(),
                                        requires_grad=bool(self.phrase_ids))
        self.space.backbone.requires_grad_(not config.freeze_backbone)
        # DINOv2's mask token enters only masked-image pre-training, which LexVLA never runs:
        # trainable, it gets no gradient, and DDP then fails every run on several processes
        self.space.backbone.embeddings.mask_token.requires_grad_(False)

    def text_codebook(self) -> Tensor:
        """[V, d]: the frozen word rows, then the trained phrase rows."""
        return torch.cat([self.space.text_codebook[:len(self.word_ids)], self.phrase_text])

    def sync_text_codebook(self) -> None:
        """Write the trained phrase rows into the space's codebook (what a saved space reads)."""
        with torch.no_grad():
            self.space.text_codebook[len(self.word_ids):] = self.phrase_text.detach()

    @property
    def words(self) -> list[str]:
        return self.space.words

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def build(cls, config: LexVLAConfig, vlm: str | None = None) -> LexVLA:
        """A fresh model: vision codebook = text codebook = the LM head rows of the kept words."""
        from peft import LoraConfig, get_peft_model

        lm = load_text_model(config.text_model)
        tokenizer = load_tokenizer(config.text_model)
        words, word_ids = prune_vocabulary(tokenizer, config.vocabulary, config.min_word_length,
                                           config.stopwords)
        phrase_ids = phrase_token_ids(tokenizer, config.phrases)
        if config.backbone is not None:
            backbone = Dinov2Model.from_pretrained(config.backbone, dtype=torch.float32)
            backbone_config = backbone.config.to_diff_dict()
        else:
            backbone, backbone_config = None, Dinov2Config(**config.backbone_config).to_diff_dict()
        backbone_config = {k: v for k, v in backbone_config.items()
                           if k not in ("transformers_version", "architectures", "_name_or_path")}
        vlm = vlm or config.text_model
        vlm_mean, vlm_std = vlm_pixel_normalisation(vlm, (config.pixel_mean, config.pixel_std))
        head = lm.get_output_embeddings().weight.detach().float()
        codebook = torch.cat([head[word_ids], *(head[ids].mean(0, keepdim=True)
                                                for ids in phrase_ids)])
        units = words + list(config.phrases or [])
        space_config = SpaceConfig(
            kind="lexvla", d_model=codebook.shape[1], n_concepts=len(units),
            k=min(config.max_active, len(units)), model_name=vlm,
            model_type=AutoConfig.from_pretrained(vlm).model_type, site="pixel_values",
            layer=None, has_aligner=False, source="lexvla",
            extra={"backbone": backbone_config,
                   "adapter": {"n_heads": config.adapter_heads, "d_hidden": config.adapter_hidden},
                   "vocabulary": units, "image_size": config.image_size,
                   "pixel_mean": list(config.pixel_mean), "pixel_std": list(config.pixel_std),
                   "vlm_pixel_mean": vlm_mean, "vlm_pixel_std": vlm_std})
        space = LexVLASpace(space_config)
        if backbone is not None:
            space.backbone.load_state_dict(backbone.state_dict())
        with torch.no_grad():
            space.text_codebook.copy_(codebook)
            space.vision_codebook.copy_(codebook)
        space.set_vlm_vocabulary(load_tokenizer(vlm))
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                          target_modules=list(config.lora_targets), bias="none")
        return cls(config, space, get_peft_model(lm, lora), tokenizer, word_ids, phrase_ids)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> LexVLA:
        from peft import PeftModel

        path = Path(path)
        meta = json.loads((path / META_NAME).read_text())
        config = LexVLAConfig.from_dict(meta["model"])
        text_model = resolve_beside(path, config.text_model)
        space = LexVLASpace.from_pretrained(path)
        lm = load_text_model(text_model)
        codebook = lm.get_output_embeddings().weight.detach()[meta["word_ids"]].float()
        if not torch.allclose(codebook, space.text_codebook[:len(codebook)].float(), atol=1e-5):
            raise ValueError(f"{path}: its text codebook is not the LM head of {text_model!r}; "
                             "the model was trained with another text LM")
        text_lm = PeftModel.from_pretrained(lm, str(path / LORA_DIR), is_trainable=False)
        return cls(config, space, text_lm, load_tokenizer(text_model), meta["word_ids"],
                   meta.get("phrase_ids")).eval()

    def save_pretrained(self, path: str | Path, text_model: str | None = None) -> None:
        """Write the folder atomically (a temporary folder renamed into place, the previous one
        kept whole until then). ``text_model`` overrides the recorded LM path (e.g. relative to
        ``path`` for a shipped model); by default a local LM folder given by a relative path is
        recorded relative to ``path``, so the model loads from any working directory."""
        path = Path(path)
        if text_model is None:
            text_model = self.config.text_model
            if not Path(text_model).is_absolute() and Path(text_model).is_dir():
                text_model = os.path.relpath(Path(text_model).resolve(), path.resolve())
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.sync_text_codebook()
        self.space.save_pretrained(tmp)
        self.text_lm.save_pretrained(str(tmp / LORA_DIR))
        (tmp / LORA_DIR / "README.md").unlink(missing_ok=True)  # peft's blank model-card template
        for file in (tmp / LORA_DIR).iterdir():  # peft writes its safetensors owner-only
            as_umask_allows(file)
        meta = {"model": {**self.config.to_dict(),
                          "text_model": text_model},
                "word_ids": self.word_ids, "phrase_ids": self.phrase_ids}
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        old = path.with_name(f".{path.name}.old")
        if old.exists() and not path.exists():  # a save that failed between its two renames
            os.replace(old, path)
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():  # kept whole, aside, until the new model has taken its name
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)

    # -- the two towers -------------------------------------------------------------------------
    def pixels(self, images: list[Image.Image]) -> Tensor:
        """This model's input for PIL images."""
        size = self.config.image_size
        return self.space.normalize_pixels(images_to_tensor(images, size)).to(self.space.device)

    def text_hidden(self, captions: list[str]) -> Tensor:
        """Final hidden state [B, d] at the prompt's last token (LoRA active)."""
        prompts = [self.config.prompt.format(caption=c) for c in captions]
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.space.device)
        decoder = self.text_lm.get_base_model().model
        hidden = decoder(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).last_hidden_state
        return hidden[:, -1]

    def text_scores(self, captions: list[str]) -> Tensor:
        """Raw unit scores [B, V] of captions (the hidden state against the text codebook)."""
        return self.text_hidden(captions) @ self.text_codebook().T

    def text_vectors(self, captions: list[str], sparse: bool = False) -> Tensor:
        vectors = F.normalize(lexical_activation(self.text_scores(captions)), dim=-1)
        return drop_below(vectors, self.space.threshold) if sparse else vectors

    def image_vectors(self, pixel_values: Tensor, sparse: bool = False) -> Tensor:
        return self.space.image_vectors(pixel_values, sparse)

    def forward(self, pixel_values: Tensor, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Raw word scores (image: max over patches [B, V], caption [B, V]) for training; the
        lexical vectors are ``lexical_vectors`` of them (elu + 1 is monotone, so pooling the raw
        scores equals pooling the activations, as ``LexVLASpace`` does)."""
        patch_scores = self.space.patch_features(pixel_values) @ self.space.vision_codebook.T
        return patch_scores.amax(dim=-2), self.text_scores(captions)

    def caption_words(self, captions: list[str]) -> Tensor:
        """Multi-hot [B, V] of the kept words and phrases each caption contains (by its own
        tokens; a phrase when its tokens occur in a row)."""
        column = {token_id: j for j, token_id in enumerate(self.word_ids)}
        n_words = len(self.word_ids)
        targets = torch.zeros(len(captions), n_words + len(self.phrase_ids))
        texts = [self.lead + caption for caption in captions]
        for i, ids in enumerate(self.tokenizer(texts, add_special_tokens=False)["input_ids"]):
            for token_id in ids:
                if token_id in column:
                    targets[i, column[token_id]] = 1.0
            for j, run in enumerate(self.phrase_ids):
                if contains_run(ids, run):
                    targets[i, n_words + j] = 1.0
        return targets.to(self.space.device)
