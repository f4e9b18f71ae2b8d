"""Collect (vision, text) representation pairs from an unmodified HF model through forward hooks.

LLaVA family: one forward per batch of ``USER: <image>\\n{caption} ASSISTANT:`` prompts; at the
INPUT (or output) of one decoder layer, vision = mean over image-token positions, text = mean
over every position after the image (the caption and the prompt tail, as the reference does).
The projector site reads the multi-modal projector's output (vision, mean over patches) and the
token embeddings of the same text positions. Once the site is read, a hook raises to skip the
layers above it, so extraction costs at most one plain forward. With a trained space
(``codes_of``) each row is instead the element-wise max of the space's codes over those
positions (``vlsae_hooks.pooling.pooled_code``, h wide): what a word readout with
``pool="max"`` is fitted on; with ``scores``, the max over those positions of every concept's
dense score (``pooled_scores``), what a phrase readout (``pool="max_scores"``) reads. CLIP: the projected image and
text embeddings (hooks on ``visual_projection`` / ``text_projection``).

One safetensors shard per data part, written atomically: a restarted run skips finished parts,
and ``accelerate launch`` processes each take every N-th part. A damaged data part (a cut, corrupt
or empty tar) is never finished: extraction stops with an error naming it, or with ``skip_bad``
keeps what it could read in a shard marked damaged, which the next run retries. Every skipped
sample is listed in ``skipped.jsonl`` next to the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae_training.config import ExtractConfig
from sae_training.readers import open_source
from sae_training.samples import DataError, Sample, Source
from sae_training.store import (MANIFEST, SHARD_SUFFIX, atomic_write_bytes, read_header,
                                shard_metadata, write_json, write_shard)
from vlsae_hooks.adapters import adapter_for
from vlsae_hooks.spaces import ConceptSpace
from vlsae_hooks.pooling import masked_mean, pooled_input, prefill_masks

log = logging.getLogger(__name__)

_IDENTITY = ("model", "model_type", "site", "layer", "d_model", "prompt", "codes_of", "pool")
"""Shard info that must agree for shards to share a folder."""
SKIP_REPORT = "skipped.jsonl"
"""One line per skipped sample or damaged data part, rewritten with the manifest."""


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
        return {"model": model_name, "model_type": self.model_type, "site": self.site,
                "layer": self.layer, "d_model": self.d_model,
                "prompt": getattr(self, "prompt", None), "codes_of": getattr(self, "codes_of", None),
                "pool": getattr(self, "pool", None)}


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Embedding tables are never quantised, so they tell the activations' device and dtype."""
    weight = model.get_input_embeddings().weight
    return weight.device, weight.dtype


class VLMExtractor(Extractor):
    """llava-hf LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL decoder sites, LLaVA projector site."""

    def __init__(self, model: nn.Module, processor, site: str = "layer_input",
                 layer: int | None = None,
                 prompt: str = "USER: <image>\n{caption} ASSISTANT:",
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
        if self.prompt != "chat":
            return [self.prompt.replace("{caption}", c) for c in captions]
        return [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": c}]}],
            add_generation_prompt=True) for c in captions]

    @torch.inference_mode()
    def __call__(self, samples: list[Sample]) -> tuple[Tensor, Tensor]:
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
        captured: dict[str, Tensor] = {}
        handles = [self.model.visual_projection.register_forward_hook(
                       lambda m, a, out: captured.__setitem__("vision", out)),
                   self.model.text_projection.register_forward_hook(
                       lambda m, a, out: captured.__setitem__("text", out))]
        try:
            self.model(**batch)
        finally:
            for handle in handles:
                handle.remove()
        return captured["vision"].float(), captured["text"].float()


def make_extractor(model: nn.Module, processor, site: str | None = None,
                   layer: int | None = None,
                   prompt: str = "USER: <image>\n{caption} ASSISTANT:",
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
            raise ValueError("--scores pools a space's concept scores; name the space with --codes-of")
        return VLMExtractor(model, processor, site or "layer_input", layer, prompt)
    from vlsae_hooks.spaces import VLSAESpace, read_config
    from vlsae_hooks.spaces.folder import WEIGHTS_NAME

    if read_config(codes_of).kind != VLSAESpace.kind:
        raise ValueError(f"{codes_of} is not a VL-SAE space; pooled codes need one")
    space = VLSAESpace.from_pretrained(codes_of, load_readout=False)  # a broken readout is refitted
    device, _ = _device_dtype(model)
    space.to(device).eval()
    with open(Path(codes_of) / WEIGHTS_NAME, "rb") as file:
        weights = hashlib.file_digest(file, "sha256").hexdigest()
    return VLMExtractor(model, processor, site or space.config.site,
                        space.config.layer if layer is None else layer, prompt, space,
                        f"{codes_of} (sha256 {weights[:16]})",  # a retrained space: new shards
                        scores)


def _batches(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    iterator = iter(samples)
    while batch := list(islice(iterator, size)):
        yield batch


def _finished(path: Path) -> bool:
    """Shards are written atomically, so one that exists is whole, unless ``max_samples`` cut
    its part short or its data was damaged (then a later run redoes it)."""
    if not path.exists():
        return False
    info = shard_metadata(path)["info"]
    return not info.get("truncated", False) and not info.get("damaged")


def _check_folder(out: Path, info: dict) -> None:
    """Refuse to mix shards of different models / sites / layers in one folder."""
    wanted = {k: info[k] for k in _IDENTITY}
    for path in sorted(out.glob(f"*{SHARD_SUFFIX}"))[:1]:
        have = {k: shard_metadata(path)["info"].get(k) for k in _IDENTITY}
        if have != wanted:
            raise ValueError(f"{out} already holds activations of {have}; this run would "
                             f"write {wanted}. Use another output folder.")


def extract(extractor: Extractor, source: Source, out: str | Path, model_name: str, *,
            batch_size: int = 16, save_dtype: str = "auto", max_samples: int | None = None,
            process_index: int = 0, num_processes: int = 1, skip_bad: bool = False) -> list[Path]:
    """Write this process's parts of ``source`` as shards in ``out``; returns the new shards.

    Process ``i`` of ``n`` takes parts i, i + n, ...; parts whose shard exists are skipped.
    Damaged parts raise ``DataError`` (after the others are done) unless ``skip_bad``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = extractor.info(model_name)
    _check_folder(out, info)
    parts = source.parts()[process_index::num_processes]
    todo = [p for p in parts if not _finished(out / f"{p.name}{SHARD_SUFFIX}")]
    log.info("%s site=%s layer=%s: %d parts for process %d/%d, %d already done", model_name,
             extractor.site, extractor.layer, len(parts), process_index, num_processes,
             len(parts) - len(todo))
    sizes = [p.size for p in todo]
    total = sum(sizes) if None not in sizes else None
    if max_samples is not None:
        total = min(total, max_samples) if total is not None else max_samples
    budget = max_samples
    written: list[Path] = []
    damaged: list[str] = []
    with tqdm(total=total, desc=f"extract[{process_index}]", unit="pair",
              disable=process_index != 0) as bar:
        for part in todo:
            if budget == 0:
                break
            skipped_before = len(source.skipped.records)
            vision, text, keys, captions = [], [], [], []
            rows = iter(part)
            for batch in _batches(islice(rows, budget), batch_size):
                v, t = extractor(batch)
                dtype = v.dtype if save_dtype == "auto" else getattr(torch, save_dtype)
                vision.append(v.to("cpu", dtype))
                text.append(t.to("cpu", dtype))
                keys += [s.key for s in batch]
                captions += [s.caption for s in batch]
                bar.update(len(batch))
            truncated = budget == len(keys) and next(rows, None) is not None
            skips = source.skipped.records[skipped_before:]
            damage = source.damaged.get(part.name)
            if budget is not None:
                budget -= len(keys)
            if damage:
                damaged.append(f"{part.file or part.name}: {damage}; {len(keys)} pairs "
                               f"readable, {len(skips)} skipped")
                if not skip_bad:
                    continue
            empty = torch.zeros(0, extractor.d_model)
            path = out / f"{part.name}{SHARD_SUFFIX}"
            write_shard(path, torch.cat(vision) if vision else empty,
                        torch.cat(text) if text else empty, keys, captions,
                        {**info, "skipped": len(skips), "skips": skips, "truncated": truncated,
                         "damaged": damage})
            written.append(path)
            log.info("wrote %s (%d pairs, %d skipped)%s", path.name, len(keys), len(skips),
                     f", DAMAGED: {damage}" if damage else "")
    if source.skipped.total:
        log.warning("skipped %d bad samples: %s (listed in %s)", source.skipped.total,
                    dict(source.skipped.counts), out / SKIP_REPORT)
    if damaged and not skip_bad:
        raise DataError(f"{len(damaged)} data part(s) are damaged and were not extracted:\n  "
                        + "\n  ".join(damaged) + "\nRepair or re-download them and run again "
                        "(finished shards are kept; only these are redone), or pass --skip-bad "
                        f"to keep what can be read and list the rest in {SKIP_REPORT}.")
    if damaged:
        log.warning("--skip-bad: %d damaged data part(s) kept as far as readable and marked "
                    "unfinished (a later run retries them): %s", len(damaged), damaged)
    return written


def write_manifest(out: str | Path, source: Source | None = None,
                   data: str | None = None) -> dict:
    """Describe every shard in ``out`` (in part order) in ``manifest.json``; ``data`` records
    where the image-caption pairs came from (``inspect`` reads images back from it)."""
    out = Path(out)
    files = sorted(out.glob(f"*{SHARD_SUFFIX}"))
    shards, info, skipped, truncated, damaged, report = [], {}, 0, False, [], []
    for path in files:
        meta = shard_metadata(path)
        info = info or meta["info"]
        skipped += meta["info"].get("skipped", 0)
        truncated |= meta["info"].get("truncated", False)
        if meta["info"].get("damaged"):
            damaged.append(path.name)
            report.append({"shard": path.name, "reason": "damaged data part",
                           "error": meta["info"]["damaged"]})
        report += [{"shard": path.name, **r} for r in meta["info"].get("skips", [])]
        shards.append({"file": path.name, "count": len(meta["keys"])})
    _write_report(out / SKIP_REPORT, report)
    count = sum(s["count"] for s in shards)
    if count == 0:
        raise DataError(f"no usable image-caption pairs in {data or out} ({skipped} samples "
                        f"skipped{f', see {out / SKIP_REPORT}' if report else ''}); nothing to "
                        "train on, so no manifest was written. Check --data.")
    dtype = read_header(files[0])[0]["vision"]["dtype"]
    manifest = {**{k: info.get(k) for k in _IDENTITY}, "count": count, "dtype": dtype,
                "skipped": skipped, "damaged": damaged, "source": data, "shards": shards}
    if source is not None:
        expected = {f"{p.name}{SHARD_SUFFIX}" for p in source.parts()}
        manifest["complete"] = (expected <= {s["file"] for s in shards} and not truncated
                                and not damaged)
    write_json(out / MANIFEST, manifest)
    return manifest


def _write_report(path: Path, records: list[dict]) -> None:
    """Rewrite the skip report from the shards (a stale one would list repaired data)."""
    if records:
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())
    else:
        path.unlink(missing_ok=True)


def run_extract(config: ExtractConfig, *, skip_bad: bool = False,
                allow_remote: bool = False) -> dict:
    """CLI entry: open the data (before the model, so a wrong path fails fast), load model +
    processor, split the data over accelerate processes, extract. ``skip_bad``: keep going past
    damaged data parts; ``allow_remote``: read ``pipe:`` commands and URLs."""
    from sae_training.distributed import make_state
    from sae_training.logs import setup_logging

    state = make_state()
    out = Path(config.out)
    setup_logging(out, "extract", state.process_index)
    reader_options = {k: v for k, v in (("caption_column", config.caption_column),
                                        ("image_column", config.image_column)) if v}
    source = open_source(config.data, allow_remote, **reader_options)
    if hasattr(source, "rows_per_part"):
        source.rows_per_part = config.rows_per_part
    model, processor = load_model(config.model, config.dtype, config.load_in_4bit, state.device)
    extractor = make_extractor(model, processor, config.site, config.layer, config.prompt,
                               config.codes_of, config.scores)
    extract(extractor, source, out, config.model, batch_size=config.batch_size,
            save_dtype=config.save_dtype, max_samples=config.max_samples,
            process_index=state.process_index, num_processes=state.num_processes,
            skip_bad=skip_bad)
    state.wait_for_everyone()
    manifest = write_manifest(out, source, config.data) if state.is_main_process else {}
    if manifest:
        log.info("manifest: %d pairs in %d shards (d=%d, %s)", manifest["count"],
                 len(manifest["shards"]), manifest["d_model"], manifest["dtype"])
    return manifest


def load_model(name: str, dtype: str = "auto", load_in_4bit: bool = False,
               device: torch.device | str = "cpu") -> tuple[nn.Module, object]:
    """A VLM (``AutoModelForImageTextToText``) or a ``CLIPModel`` + its processor, for inference."""
    from transformers import (AutoConfig, AutoModelForImageTextToText, AutoProcessor,
                              BitsAndBytesConfig, CLIPModel)

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
    model = cls.from_pretrained(name, **kwargs).eval()
    return model, AutoProcessor.from_pretrained(name)
