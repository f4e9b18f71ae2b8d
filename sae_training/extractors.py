"""Extractors: one per model kind, each mapping a batch of image-caption samples to a (vision,
text) pair of representations read through forward hooks on an unmodified HF model.

LLaVA family: one forward per batch of ``USER: <image>\\n{caption} ASSISTANT:`` prompts; at the
INPUT (or output) of one decoder layer, vision = mean over image-token positions, text = mean
over every position after the image (the caption and the prompt tail, as the reference does).
The projector site reads the multi-modal projector's output (vision, mean over patches) and the
token embeddings of the same text positions. Once the site is read, a hook raises to skip the
layers above it, so extraction costs at most one plain forward. With a trained space
(``codes_of``) each row is instead the element-wise max of the space's codes over those
positions (``vlsae_hooks.pooling.pooled_code``, h wide): what a word readout with
``pool="max"`` is fitted on; with ``scores``, the max over those positions of every concept's
dense score (``pooled_scores``), what a phrase readout (``pool="max_scores"``) reads. Masks and
pooling are the runtime's own (``vlsae_hooks.pooling``), so a space sees what it steers with.
CLIP: the projected image and text embeddings (``vlsae_hooks.clip.ClipEmbeddingRecorder``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from sae_training.config import LLAVA_PROMPT
from sae_training.hub_kernels import offline_kernels
from sae_training.samples import Sample
from vlsae_hooks.adapters import adapter_for
from vlsae_hooks.clip import ClipEmbeddingRecorder
from vlsae_hooks.pooling import masked_mean, pooled_input, prefill_masks
from vlsae_hooks.spaces import ConceptSpace, VLSAESpace, read_config
from vlsae_hooks.word_evidence import space_fingerprint


def default_layer(n_layers: int) -> int:
    """The reference reads layer 30 of LLaVA-1.5-7B's 32; keep the same relative depth."""
    return min(n_layers - 1, round(30 * n_layers / 32))


class _SiteRead(Exception):
    """Raised by a hook once the site is captured: the rest of the model need not run."""


class Extractor:
    """Maps a batch of samples to float (vision [b, d], text [b, d]) representations."""

    model_type: str
    site: str
    layer: int | None
    d_model: int

    def __call__(self, samples: list[Sample]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def info(self, model_name: str) -> dict:
        """What the rows are (recorded in every shard): shards that differ in it never share a
        folder."""
        return {"model": model_name, "model_type": self.model_type, "site": self.site,
                "layer": self.layer, "d_model": self.d_model,
                "prompt": getattr(self, "prompt", None),
                "codes_of": getattr(self, "codes_of", None), "pool": getattr(self, "pool", None)}


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Embedding tables are never quantised, so they tell the activations' device and dtype."""
    weight = model.get_input_embeddings().weight
    return weight.device, weight.dtype


class VLMExtractor(Extractor):
    """llava-hf LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL decoder sites, LLaVA projector site."""

    def __init__(self, model: nn.Module, processor, site: str = "layer_input",
                 layer: int | None = None, prompt: str = LLAVA_PROMPT,
                 space: ConceptSpace | None = None, space_name: str | None = None,
                 scores: bool = False) -> None:
        self.model, self.processor, self.prompt = model, processor, prompt
        self.space, self.codes_of = space, space_name if space is not None else None
        if scores and space is None:
            raise ValueError("pooled concept scores need a space (codes_of)")
        self.pool = "max_scores" if scores else None
        """None: pooled top-k codes (or mean states without a space); "max_scores": pooled
        dense concept scores."""
        self.adapter = adapter_for(model)
        self.model_type = model.config.model_type
        image_token = getattr(processor, "image_token", "<image>")
        if prompt != "chat" and image_token != "<image>":
            raise ValueError(f"the prompt marks the image with LLaVA's '<image>', which this "
                             f"{self.model_type} model's processor does not read (its image "
                             f"token is {image_token!r}, placed by its chat template): pass "
                             "prompt='chat' (--prompt chat)")
        self.image_token_id = self.adapter.vision_token_ids(model)[0]
        self.d_model = self.adapter.hidden_size(model)
        n_layers = len(self.adapter.layers(model))
        if site in ("layer_input", "layer_output"):
            layer = default_layer(n_layers) if layer is None else layer
            if not 0 <= layer < n_layers:
                raise ValueError(f"layer {layer} out of range: the model has {n_layers} layers")
        elif site == "projector_output":
            if self.model_type != "llava":
                raise ValueError("the projector_output site is implemented for LLaVA-1.5 "
                                 f"(model_type 'llava'), not {self.model_type!r}")
            layer = None
        else:
            raise ValueError(f"site {site!r} does not apply to a VLM; use layer_input, "
                             "layer_output or projector_output")
        self.site, self.layer = site, layer
        if space is not None:
            self._check_space(space)
            self.d_model = space.config.n_concepts

    def _check_space(self, space: ConceptSpace) -> None:
        """Pooled codes only mean something at the site the space was trained on."""
        config = space.config
        if not config.site.startswith("layer_"):
            raise ValueError(f"pooled codes are read at a decoder layer; the space was trained "
                             f"on {config.site!r}")
        if (config.site, config.layer) != (self.site, self.layer) or config.d_model != self.d_model:
            raise ValueError(f"the space for pooled codes was trained on {config.site} of layer "
                             f"{config.layer} ({config.d_model} wide); this extraction reads "
                             f"{self.site} of layer {self.layer} ({self.d_model} wide): pass the "
                             "space's own --site and --layer")

    def prompts(self, captions: list[str]) -> list[str]:
        """Each caption in the prompt, or in the processor's chat template for "chat"."""
        if self.prompt != "chat":
            return [self.prompt.replace("{caption}", c) for c in captions]
        return [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": c}]}],
            add_generation_prompt=True) for c in captions]

    @torch.inference_mode()
    def site_states(self, samples: list[Sample]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """One forward up to the site: what it holds there ("hidden" [b, T, d] at a decoder
        layer; "vision" and "text" at the projector), the image positions and the positions
        after the image (bool [b, T]). Per-patch readouts read the image positions one by one."""
        device, dtype = _device_dtype(self.model)
        batch = self.processor(images=[s.image for s in samples],
                               text=self.prompts([s.caption for s in samples]),
                               return_tensors="pt", padding=True, padding_side="left")
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        image, after = prefill_masks(ids, mask, torch.tensor([self.image_token_id]))
        if not image.any(dim=1).all():
            raise ValueError("a prompt has no image token; does the prompt contain the "
                             "processor's image token?")
        if not after.any(dim=1).all():
            raise ValueError("a prompt has no tokens after the image")
        captured: dict[str, Tensor] = {}

        def read(name: str, stop: bool):
            def hook(module, args, kwargs, output=None):
                value = output if output is not None else (args[0] if args else
                                                           kwargs["hidden_states"])
                captured[name] = value[0] if isinstance(value, tuple) else value
                if stop:
                    raise _SiteRead
            return hook

        handles = []
        if self.site == "projector_output":
            handles.append(self.model.get_input_embeddings().register_forward_hook(
                read("text", stop=False), with_kwargs=True))
            handles.append(self.adapter.vision_projector(self.model).register_forward_hook(
                read("vision", stop=True), with_kwargs=True))
        else:
            target = self.adapter.layers(self.model)[self.layer]
            if self.site == "layer_input":
                handles.append(target.register_forward_pre_hook(read("hidden", True),
                                                                with_kwargs=True))
            else:
                handles.append(target.register_forward_hook(read("hidden", True),
                                                            with_kwargs=True))
        try:
            self.model(**batch, use_cache=False)
        except _SiteRead:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return captured, image, after

    @torch.inference_mode()
    def __call__(self, samples: list[Sample]) -> tuple[Tensor, Tensor]:
        captured, image, after = self.site_states(samples)
        if self.site == "projector_output":
            vision = captured["vision"].float().mean(dim=1)
            return vision, masked_mean(captured["text"], after)
        hidden = captured["hidden"]
        if self.space is not None:
            pool = self.pool or "max"
            return (pooled_input(self.space, hidden, image, "vision", pool),
                    pooled_input(self.space, hidden, after, "text", pool))
        return masked_mean(hidden, image), masked_mean(hidden, after)


class ClipExtractor(Extractor):
    """CLIP's projected image and text embeddings (the space its logits use)."""

    def __init__(self, model: nn.Module, processor) -> None:
        self.model, self.processor = model, processor
        self.model_type, self.site, self.layer = "clip", "clip_embeds", None
        self.d_model = model.config.projection_dim
        self.max_length = model.config.text_config.max_position_embeddings

    @torch.inference_mode()
    def __call__(self, samples: list[Sample]) -> tuple[Tensor, Tensor]:
        batch = self.processor(images=[s.image for s in samples],
                               text=[s.caption for s in samples], return_tensors="pt",
                               padding=True, truncation=True, max_length=self.max_length)
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(
            self.model.vision_model.embeddings.patch_embedding.weight.dtype)
        with ClipEmbeddingRecorder(self.model) as recorder:
            self.model(**batch)
        return recorder.image_embeds.float(), recorder.text_embeds.float()


def make_extractor(model: nn.Module, processor, site: str | None = None,
                   layer: int | None = None, prompt: str = LLAVA_PROMPT,
                   codes_of: str | None = None, scores: bool = False) -> Extractor:
    """The extractor for ``model``'s family; ``site=None`` picks the reference's site (or, with
    ``codes_of``, a space folder, that space's site, and rows become its pooled codes, or with
    ``scores`` its pooled dense concept scores)."""
    if model.config.model_type == "clip":
        if site not in (None, "clip_embeds") or codes_of:
            raise ValueError(f"CLIP has only the clip_embeds site, not {site!r}, and no "
                             "per-position codes to pool")
        return ClipExtractor(model, processor)
    if codes_of is None:
        if scores:
            raise ValueError("--scores pools a space's concept scores; name the space with "
                             "--codes-of")
        return VLMExtractor(model, processor, site or "layer_input", layer, prompt)
    if read_config(codes_of).kind != VLSAESpace.kind:
        raise ValueError(f"{codes_of} is not a VL-SAE space; pooled codes need one")
    space = VLSAESpace.from_pretrained(codes_of, load_readout=False)  # a broken readout is refitted
    device, _ = _device_dtype(model)
    space.to(device).eval()
    return VLMExtractor(model, processor, site or space.config.site,
                        space.config.layer if layer is None else layer, prompt, space,
                        codes_label(codes_of), scores)


def codes_label(space_dir: str | Path) -> str:
    """How an extraction of a space's codes names the space: its folder and the start of its
    weights' sha256, so that a space retrained into the same folder makes new shards, and a
    readout fitted on them can tell (``label_fingerprint``)."""
    return f"{space_dir} (sha256 {space_fingerprint(space_dir)[:16]})"


def label_fingerprint(label: str) -> str | None:
    """The sha256 start a ``codes_label`` records; None for a label that records none."""
    found = re.search(r"\(sha256 ([0-9a-f]{16})\)$", label)
    return found[1] if found else None


def require_existing(name: str, what: str) -> None:
    """Raise if ``name`` is written as a local path (it starts with /, . or ~, or has more than
    the one / of a hub id ``owner/name``) that does not exist: transformers would call it a bad
    hub id, or ask for a tokenizer library to be installed."""
    path_like = name.startswith(("/", ".", "~")) or name.count("/") > 1
    if path_like and not Path(name).exists():
        raise FileNotFoundError(f"{what} {name} does not exist: pass an existing folder or a hub "
                                "name (owner/name)")


def load_model(name: str, dtype: str = "auto", load_in_4bit: bool = False,
               device: torch.device | str = "cpu") -> tuple[nn.Module, object]:
    """A VLM (``AutoModelForImageTextToText``) or a ``CLIPModel`` + its processor, for inference."""
    require_existing(name, "--model")
    from transformers import (
        AutoConfig,
        AutoModelForImageTextToText,
        AutoProcessor,
        BitsAndBytesConfig,
        CLIPModel,
    )

    device = torch.device(device)
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    torch_dtype = getattr(torch, dtype)
    kwargs: dict = {"dtype": torch_dtype, "device_map": {"": str(device)}}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True,
                                                           bnb_4bit_compute_dtype=torch_dtype)
    model_type = AutoConfig.from_pretrained(name).model_type
    cls = CLIPModel if model_type == "clip" else AutoModelForImageTextToText
    model = cls.from_pretrained(name, **offline_kernels(kwargs)).eval()
    return model, AutoProcessor.from_pretrained(name)
