"""Train the shipped toy models the way LLaVA itself is built (DESIGN.md section 6, recipe B).

Stage 1: a tiny ``CLIPModel`` on the world, contrastive loss plus object-presence losses read from
exactly the tensor LLaVA feeds its projector (so its tower sees every object). Stage 2: a tiny
``LlavaForConditionalGeneration`` with that tower copied in and frozen; projector and Llama learn
captions and multi-turn yes/no answers. Seeded; a finished stage is reused on a re-run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import CLIPModel, LlavaForConditionalGeneration

from ..run_log import run_log
from .build import (
    PATCH,
    build_clip_processor,
    build_llava_processor,
    build_tokenizer,
    clip_config,
    llava_config,
)
from .conversations import conversation, padded_batch, sequence_mean_loss, yes_no_turns
from .language import DESCRIBE_PROMPTS, caption
from .train_stages import StageCheckpoint, Stages
from .world import (
    CLASSES,
    IMAGE_SIZE,
    STREAM_TRAIN,
    RenderedScene,
    WorldConfig,
    make_scene,
)

log = logging.getLogger(__name__)


@dataclass
class ToyTrainConfig:
    """Settings of the toy-model recipe; the defaults produced the shipped weights."""

    seed: int = 1
    clip_steps: int = 900
    """Stage 1 steps (contrastive + presence)."""
    clip_batch: int = 128
    """Stage 1 scenes per step. 900 x 128 is DESIGN.md's recipe B (about 10 minutes on 2
    cores); the tower of the first toy models (600 x 64) told a red star from a red ring poorly
    (a patch probe's AUC 0.78 against 0.87), and no readout could bind colour to shape on it
    (docs/efficacy.md, "Binding")."""
    clip_lr: float = 2e-3
    patch_weight: float = 10.0
    """Weight of the per-patch presence loss relative to the image-level one."""
    llava_steps: int = 500
    """Stage 2 steps."""
    llava_scenes: int = 40
    """Scenes per stage-2 step; each gives a caption and a multi-turn yes/no conversation."""
    llava_lr: float = 1.5e-3
    yes_no_turns: int = 6
    threads: int = 2
    device: str = "cpu"
    world: WorldConfig = field(default_factory=WorldConfig)
    clip_world: WorldConfig | None = field(default_factory=lambda: WorldConfig(hidden_prob=0.0))
    """World of the CLIP stage (None: ``world``). No half-hidden partners there keeps the tower
    from learning "mate, so probably its partner" (with ``world``'s 0.3 it did, and the image
    side then showed no more than the model's answers: ``evidence``), leaving the pair prior to
    the language model, where decode-time methods can reach it."""

    def __post_init__(self) -> None:
        from sae_training.config import check_finite, check_positive
        from vlsae_hooks.placement import requested_device

        check_finite(self)
        check_positive("ToyTrainConfig", clip_steps=self.clip_steps, clip_batch=self.clip_batch,
                       llava_steps=self.llava_steps, llava_scenes=self.llava_scenes,
                       yes_no_turns=self.yes_no_turns, threads=self.threads,
                       clip_lr=self.clip_lr, llava_lr=self.llava_lr)
        if self.patch_weight < 0:
            raise ValueError(f"ToyTrainConfig.patch_weight must be >= 0, got {self.patch_weight}")
        requested_device(self.device)  # a GPU this machine lacks: refused before any work


def to_pixels(images: list) -> torch.Tensor:
    """PIL images -> [B, 3, H, W] in [-1, 1]; equal to the shipped CLIPImageProcessor's output."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def patch_targets(scenes: list[RenderedScene]) -> torch.Tensor:
    """[B, patches, C]: does class c cover at least a fifth of the patch."""
    g = IMAGE_SIZE // PATCH
    masks = np.stack([s.masks for s in scenes]).reshape(len(scenes), len(CLASSES),
                                                        g, PATCH, g, PATCH)
    cover = masks.mean(axis=(3, 5)).reshape(len(scenes), len(CLASSES), g * g)
    return torch.from_numpy(cover > 0.2).float().transpose(1, 2)


def presence_targets(scenes: list[RenderedScene]) -> torch.Tensor:
    t = torch.zeros(len(scenes), len(CLASSES))
    for i, s in enumerate(scenes):
        t[i, list(s.scene.classes)] = 1
    return t


def _cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, total: int, warmup: int) -> None:
    lr = (base * (step + 1) / warmup if step < warmup
          else base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
    for g in opt.param_groups:
        g["lr"] = lr


def _scenes(cfg: ToyTrainConfig, offset: int, n: int,
            world: WorldConfig | None = None) -> list[RenderedScene]:
    return [make_scene(cfg.seed, STREAM_TRAIN, offset + i, world or cfg.world) for i in range(n)]


def train_clip(cfg: ToyTrainConfig, checkpoint: StageCheckpoint | None = None) -> CLIPModel:
    """Stage 1: contrastive CLIP whose patch tokens also predict which objects they show; with
    a ``checkpoint``, going on from its last save and saving along."""
    torch.manual_seed(cfg.seed)
    tok = build_tokenizer(for_clip=True)
    model = CLIPModel(clip_config(tok)).to(cfg.device)
    width = model.config.vision_config.hidden_size
    heads = torch.nn.ModuleDict({"image": torch.nn.Linear(width, len(CLASSES)),
                                 "patch": torch.nn.Linear(width, len(CLASSES))}).to(cfg.device)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.clip_lr, weight_decay=0.01)
    rng = np.random.default_rng([cfg.seed, 1])
    modules = {"model": model, "heads": heads}
    start = checkpoint.resume(modules, opt, rng) if checkpoint is not None else 0
    bar = tqdm(range(start, cfg.clip_steps), desc="toy CLIP", dynamic_ncols=True,
               initial=start, total=cfg.clip_steps)
    for step in bar:
        scenes = _scenes(cfg, step * cfg.clip_batch, cfg.clip_batch, cfg.clip_world)
        text = tok([caption(s.scene, rng) for s in scenes], padding=True,
                   return_tensors="pt").to(cfg.device)
        _cosine_lr(opt, cfg.clip_lr, step, cfg.clip_steps, warmup=30)
        with torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16):
            out = model(**text, pixel_values=to_pixels([s.image for s in scenes]).to(cfg.device),
                        return_loss=True)
            # what LLaVA's projector reads
            patches = out.vision_model_output.last_hidden_state[:, 1:]
            image_loss = F.binary_cross_entropy_with_logits(
                heads["image"](patches.mean(1)).float(), presence_targets(scenes).to(cfg.device))
            patch_loss = F.binary_cross_entropy_with_logits(
                heads["patch"](patches).float(), patch_targets(scenes).to(cfg.device))
            loss = out.loss.float() + image_loss + cfg.patch_weight * patch_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == cfg.clip_steps - 1:
            pred = heads["image"](patches.mean(1)).float() > 0
            truth = presence_targets(scenes).to(cfg.device) > 0
            f1 = 2 * (pred & truth).sum() / (pred.sum() + truth.sum()).clamp(min=1)
            msg = dict(step=step, clip=round(out.loss.item(), 4), image=round(image_loss.item(), 4),
                       patch=round(patch_loss.item(), 4), presence_f1=round(f1.item(), 3))
            bar.set_postfix(msg)
            log.info("clip %s", msg)
        if checkpoint is not None:
            checkpoint.save(step, modules, opt, rng)
    return model.cpu().eval()


def train_llava(cfg: ToyTrainConfig, clip: CLIPModel,
                checkpoint: StageCheckpoint | None = None) -> LlavaForConditionalGeneration:
    """Stage 2: LLaVA with the stage-1 tower frozen inside; with a ``checkpoint``, going on from
    its last save and saving along."""
    torch.manual_seed(cfg.seed + 1)
    tok = build_tokenizer()
    model = LlavaForConditionalGeneration(llava_config(tok))
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    model.model.vision_tower.requires_grad_(False)
    model.to(cfg.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.llava_lr, weight_decay=0.01)
    rng = np.random.default_rng([cfg.seed, 2])
    model.train()
    start = checkpoint.resume({"model": model}, opt, rng) if checkpoint is not None else 0
    bar = tqdm(range(start, cfg.llava_steps), desc="toy LLaVA", dynamic_ncols=True,
               initial=start, total=cfg.llava_steps)
    for step in bar:
        scenes = _scenes(cfg, 10_000_000 + step * cfg.llava_scenes, cfg.llava_scenes)
        seqs, images = [], []
        for s in scenes:
            prompt = DESCRIBE_PROMPTS[int(rng.integers(len(DESCRIBE_PROMPTS)))]
            seqs.append(conversation(tok, [(prompt, caption(s.scene, rng))]))
            seqs.append(conversation(tok, yes_no_turns(s, rng, cfg.yes_no_turns)))
            images += [s.image, s.image]
        batch = {k: v.to(cfg.device) for k, v in padded_batch(tok, seqs).items()}
        labels = batch.pop("labels")
        _cosine_lr(opt, cfg.llava_lr, step, cfg.llava_steps, warmup=30)
        with torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16):
            logits = model(**batch, pixel_values=to_pixels(images).to(cfg.device)).logits
        loss = sequence_mean_loss(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == cfg.llava_steps - 1:
            bar.set_postfix(loss=round(loss.item(), 4))
            log.info("llava step=%d loss=%.4f", step, loss.item())
        if checkpoint is not None:
            checkpoint.save(step, {"model": model}, opt, rng)
    return model.cpu().eval()


def _save_half(model, processor, path: Path) -> None:
    """Weights stored in fp16 (half the bytes), loaded back as fp32 by default."""
    path.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(path)
    model.float()
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    for key in [cfg] + [v for v in cfg.values() if isinstance(v, dict)]:
        if "dtype" in key:
            key["dtype"] = "float32"
    cfg_file.write_text(json.dumps(cfg, indent=2))
    processor.save_pretrained(path)


LLAVA_ONLY = ("llava_steps", "llava_scenes", "llava_lr", "yes_no_turns")
"""The settings only the LLaVA stage reads: changing them keeps a finished tower."""


def stage_settings(cfg: ToyTrainConfig) -> dict[str, dict]:
    """``cfg`` as the settings each stage is trained under: all but the machine's thread count
    and device, and for the CLIP stage not those only the LLaVA reads (the LLaVA stage, trained
    on the tower, is under all of them)."""
    every = {k: v for k, v in asdict(cfg).items() if k not in ("threads", "device")}
    return {"clip": {k: v for k, v in every.items() if k not in LLAVA_ONLY}, "llava": every}


def train_toy_models(out: Path, cfg: ToyTrainConfig | None = None, fresh: bool = False) -> dict:
    """Train both stages into ``out/clip`` and ``out/llava``; returns timing and settings.

    ``cfg`` defaults to ``ToyTrainConfig()``. A stage finished under the same settings (noted in
    ``out/stages.json`` once its folder is whole) is loaded instead of retrained unless
    ``fresh``; one finished under other settings is refused, so a rerun with new settings never
    keeps old weights under a summary that names the new ones.
    """
    if cfg is None:
        cfg = ToyTrainConfig()
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out, stage_settings(cfg), fresh)
    torch.set_num_threads(cfg.threads)
    timings = {}
    with run_log(out / "train.log"):
        log.info("config %s", asdict(cfg))
        t0 = time.perf_counter()
        clip_dir, llava_dir = out / "clip", out / "llava"
        if stages.reuse("clip", clip_dir):
            clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32)
            log.info("reusing %s", clip_dir)
        else:
            clip = train_clip(cfg, stages.checkpoint("clip"))
            _save_half(clip, build_clip_processor(), clip_dir)
            stages.finished("clip")
            # continue from what ships
            clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32)
        timings["clip_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if stages.reuse("llava", llava_dir):
            log.info("reusing %s", llava_dir)
        else:
            llava = train_llava(cfg, clip, stages.checkpoint("llava"))
            _save_half(llava, build_llava_processor(), llava_dir)
            stages.finished("llava")
        timings["llava_seconds"] = time.perf_counter() - t0
    summary = {"config": asdict(cfg), **timings}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
