"""Train LexVLA on image-caption pairs: InfoNCE + overuse penalty, AdamW, warm-up + cosine.

Runs under plain ``python`` or ``accelerate launch`` (each process takes its slice of every
global batch; InfoNCE and the overuse penalty see every process's rows, gathered, so N processes
train like one). Every ``checkpoint_every`` steps ``checkpoint.pt`` is written and synced in full
with the trainable weights, optimizer, scheduler, RNG, the step and the data's fingerprint, the
one before kept as ``checkpoint.prev.pt`` (a torn newest falls back to it); batches are a pure
function of (seed, step), so a resumed run on the same data continues where it stopped, and one
on changed data is refused. A lock keeps a second trainer out of the folder.
The result is ``out/model/`` (see ``model.py``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sae_training.checkpoint import (
    CHECKPOINT,
    LOG_FILE,
    PREVIOUS_CHECKPOINT,
    CheckpointFiles,
    LogWindow,
    config_changes,
    config_identity,
    locked_run_folder,
    restore_rng,
    rng_state,
    trim_log_records,
)
from sae_training.distributed import gather_across_processes, make_accelerator
from sae_training.lexvla.config import LexVLATrainConfig
from sae_training.lexvla.data import PairStream
from sae_training.lexvla.losses import (
    caption_word_loss,
    lexical_vectors,
    overuse_penalty,
    presence_loss,
    sparsity,
    top_words,
)
from sae_training.lexvla.model import LexVLA
from sae_training.losses import info_nce
from sae_training.stages import lr_lambda

log = logging.getLogger(__name__)

MODEL_DIR = "model"


def parameter_groups(model: LexVLA, config: LexVLATrainConfig) -> list[dict]:
    """Adapter + vision codebook (+ the phrases' text rows), LoRA, and (unfrozen) backbone,
    each at its learning rate. The words' text codebook is a buffer: nothing here can move it."""
    space = model.space
    codebooks = [space.vision_codebook] + ([model.phrase_text] if model.phrase_ids else [])
    groups = [{"params": [*space.adapter.parameters(), *codebooks], "lr": config.lr},
              {"params": [p for p in model.text_lm.parameters() if p.requires_grad],
               "lr": config.lora_lr}]
    if not config.model.freeze_backbone:
        groups.append({"params": [p for p in space.backbone.parameters() if p.requires_grad],
                       "lr": config.backbone_lr})
    return groups


class LexVLATrainer:
    """Owns the accelerator, model, optimizer and data stream of one run."""

    def __init__(self, config: LexVLATrainConfig, skip_bad: bool = False) -> None:
        self.config = config
        self.accelerator = make_accelerator(config.mixed_precision)
        self.out = Path(config.out)
        torch.manual_seed(config.seed)
        self.model = LexVLA.build(config.model, config.vlm)
        optimizer = torch.optim.AdamW(parameter_groups(self.model, config),
                                      weight_decay=config.weight_decay)
        self.prepared, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, config.warmup_steps, config.steps, "cosine"))
        if config.batch_size % self.accelerator.num_processes:
            raise ValueError(f"batch_size {config.batch_size} is not a multiple of the "
                             f"{self.accelerator.num_processes} processes: each takes an equal "
                             "share of every batch")
        self.stream = PairStream(config.data, config.batch_size, config.seed,
                                 config.shuffle_buffer, config.max_samples, skip_bad)
        self.checkpoints = CheckpointFiles(self.out)
        self._window = LogWindow()
        """The log window a resumed run goes on with (``_load_checkpoint``)."""

    def _trainable_state(self) -> dict:
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.model.state_dict().items() if k in names}

    def _save_checkpoint(self, step: int, window: LogWindow) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        state = {"step": step, "model": self._trainable_state(),
                 "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(),
                 "config": config_identity(self.config.to_dict()),
                 "data": self.stream.fingerprint(),
                 "rng": rng_state(),
                 "log_window": window.state()}
        self.checkpoints.write(state)  # synced, the one before kept as the previous

    def _load_checkpoint(self) -> int:
        state = self.checkpoints.read() if self.config.resume else None
        if state is None:  # a fresh start: a log left by a run killed before its first
            if self.accelerator.is_main_process:  # checkpoint is not this run's
                trim_log_records(self.out / LOG_FILE, lambda record: False)
            return 0
        path = self.out / CHECKPOINT
        changed = config_changes(state["config"], self.config.to_dict())
        if changed:
            raise ValueError(f"{path} was written with a different config (changed: {changed});"
                             " use a new --out folder or --no-resume")
        if state.get("data") not in (None, self.stream.fingerprint()):
            raise ValueError(f"the data in {self.config.data} changed since {path} was written "
                             "(its parts or their sizes differ), so resuming would train on "
                             "another stream: restore the data, or use a new --out folder or "
                             "--no-resume")
        missing = set(self._trainable_state()) - set(state["model"])
        if missing:
            raise ValueError(f"{path} lacks trainable weights {sorted(missing)[:5]}")
        self.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        self._window = LogWindow.from_state(state.get("log_window"))
        trim_log_records(self.out / LOG_FILE, lambda r: r["step"] <= state["step"])
        log.info("resumed at step %d", state["step"])
        return state["step"]

    def _step(self, images, captions) -> dict[str, float]:
        acc, config, model = self.accelerator, self.config, self.model
        rows = slice(acc.process_index, None, acc.num_processes)
        images, captions = images[rows], captions[rows]
        # every term sees every process's rows (the scores gathered with their gradient), so
        # N processes train like one: InfoNCE and the overuse penalty are batch-level, and the
        # caption-word loss averages over the batch's rows that hold a kept word
        image_scores, text_scores = map(gather_across_processes,
                                        self.prepared(model.pixels(images), captions))
        image, text = lexical_vectors(image_scores), lexical_vectors(text_scores)
        contrast = info_nce(image, text, config.temperature)
        overuse = overuse_penalty(image) + overuse_penalty(text)
        loss = contrast + config.overuse_weight * overuse
        words, presence = torch.zeros(()), torch.zeros(())
        if config.caption_word_weight > 0 or config.presence_weight > 0:
            targets = gather_across_processes(model.caption_words(captions))
        if config.caption_word_weight > 0:
            words = (caption_word_loss(image_scores, targets)
                     + caption_word_loss(text_scores, targets))
            loss = loss + config.caption_word_weight * words
        if config.presence_weight > 0:
            presence = presence_loss(image_scores, targets) + presence_loss(text_scores, targets)
            loss = loss + config.presence_weight * presence
        acc.backward(loss)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            hits = (image @ text.T).argmax(1) == torch.arange(len(image), device=image.device)
        threshold = model.space.threshold
        return {"loss": float(loss.detach()), "infonce": float(contrast.detach()),
                "overuse": float(overuse.detach()), "caption_words": float(words.detach()),
                "presence": float(presence.detach()),
                "batch_i2t_acc": float(hits.float().mean()),
                "sparsity_image": sparsity(image.detach(), threshold),
                "sparsity_text": sparsity(text.detach(), threshold),
                "_top": (top_words(image[0].detach(), model.words),
                         top_words(text[0].detach(), model.words))}

    def fit(self) -> dict:
        """Train (resuming when possible), save ``out/model``, return the last log record."""
        self.out.mkdir(parents=True, exist_ok=True)
        with locked_run_folder(self.out, self.accelerator.is_main_process):
            return self._fit()

    def _fit(self) -> dict:
        config, acc = self.config, self.accelerator
        if not config.resume and acc.is_main_process:  # nothing of an earlier run is kept
            for name in (CHECKPOINT, PREVIOUS_CHECKPOINT, LOG_FILE):
                (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(self.out / MODEL_DIR, ignore_errors=True)
        start = self._load_checkpoint()
        self.model.train()
        log.info("LexVLA: %d words, backbone %s, %d trainable parameters, %d process(es)",
                 len(self.model.words), "frozen" if config.model.freeze_backbone else "trained",
                 sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                 acc.num_processes)
        window, record = self._window, {}
        bar = tqdm(total=config.steps, initial=start, desc="lexvla", unit="step",
                   disable=not acc.is_main_process)
        if start < config.steps:
            for step, images, captions in self.stream.batches(start):
                stats = self._step(images, captions)
                top = stats.pop("_top")
                window.add(stats)
                done = step + 1
                if done % config.log_every == 0 or done == config.steps:
                    record = {"step": done, "lr": self.scheduler.get_last_lr()[0],
                              **window.close()}
                    if acc.is_main_process:
                        with (self.out / LOG_FILE).open("a") as f:
                            f.write(json.dumps(record) + "\n")
                    log.info("step %d/%d: %s | %r: image %s, text %s", done, config.steps,
                             ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"),
                             captions[0], *top)
                    bar.set_postfix(loss=f"{record['loss']:.4g}")
                if done % config.checkpoint_every == 0 or done == config.steps:
                    self._save_checkpoint(done, window)
                bar.update(1)
                if done == config.steps:
                    break
        bar.close()
        self.model.eval()
        if acc.is_main_process:
            self.model.save_pretrained(self.out / MODEL_DIR)
            log.info("saved %s", self.out / MODEL_DIR)
        acc.wait_for_everyone()
        if not record and (self.out / LOG_FILE).is_file():  # a finished run, run again
            lines = (self.out / LOG_FILE).read_text().splitlines()
            record = json.loads(lines[-1]) if lines else {}
        return record


def train(config: LexVLATrainConfig, skip_bad: bool = False) -> dict:
    """Train (or resume) a LexVLA; returns the last training log record. ``skip_bad``: train on
    the readable pairs of damaged data (else a damaged part stops the run once read)."""
    from sae_training.logs import setup_logging

    trainer = LexVLATrainer(config, skip_bad)
    setup_logging(Path(config.out), "train", trainer.accelerator.process_index)
    return trainer.fit()
