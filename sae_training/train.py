"""Learn a VL-SAE concept space from extracted activations: aligner first (LLaVA), then the SAE.

Runs the same under plain ``python`` (CPU or one GPU) and ``accelerate launch`` (many GPUs: each
process takes a slice of every global batch; gradients are averaged by DDP). Every
``checkpoint_every`` steps one file, ``checkpoint.pt``, is replaced atomically with everything a
restart needs: weights, optimizer, scheduler, RNG states, the dead-concept counters, the data
position (stage, step) and a fingerprint of the data. Batches are a pure function of (seed,
stage, epoch, step), so a killed run that resumes ends where an uninterrupted one does. The one
before it is kept as ``checkpoint.prev.pt``: a newest file torn by a crash or a full disk falls
back to it. A lock on the run folder keeps a second trainer out of it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae_training.config import AlignerConfig, SAEConfig, TrainConfig
from sae_training.distributed import make_accelerator
from sae_training.losses import AlignerObjective, SAEObjective
from sae_training.metrics import dead_fraction, evaluate
from sae_training.sparse import reconstruct
from sae_training.store import ActivationStore, atomic_write_bytes, write_json
from vlsae_hooks.spaces import VLSAE, AuxAligner, SpaceConfig, VLSAESpace

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
LOCK_FILE = ".lock"
ALIGNER_FILE = "aligner.safetensors"
LOG_FILE = "train_log.jsonl"
STAGES = ("aligner", "sae")
MIN_VAL, MIN_TRAIN = 2, 2
"""Fewest held-out pairs (explained variance needs a spread) and training pairs."""


def lr_lambda(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class _Stage:
    name: str
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batch_size: int
    steps_per_epoch: int
    total_steps: int


class Trainer:
    """Holds the data split and the accelerator; ``fit()`` runs (or resumes) both stages."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.accelerator = make_accelerator(config.mixed_precision)
        self.out = Path(config.out)
        self.store = ActivationStore(config.data, config.max_samples)
        self.manifest = self.store.manifest
        self.use_aligner = (config.use_aligner if config.use_aligner is not None
                            else self.manifest["site"] != "clip_embeds")
        n = len(self.store)
        if n < MIN_VAL + MIN_TRAIN:
            raise ValueError(f"{config.data} gives {n} pair(s) (max_samples={config.max_samples})"
                             f"; training needs at least {MIN_VAL + MIN_TRAIN}: {MIN_VAL} held "
                             f"out for the metrics and {MIN_TRAIN} to train on")
        self.d = self.store.d
        h = config.sae.expansion * self.d
        if config.sae.k > h:
            raise ValueError(f"k={config.sae.k} exceeds the number of concepts h={h} "
                             f"({config.sae.expansion} x d={self.d}); lower --sae-k or raise "
                             "--sae-expansion")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
        n_val = min(max(MIN_VAL, min(round(n * config.val_fraction), config.max_val_samples)),
                    n - MIN_TRAIN)
        self.val_rows, self.train_rows = perm[:n_val], perm[n_val:]
        self.resume_state: dict | None = None
        self.newest_torn = False
        """``checkpoint.pt`` was unreadable: the next save overwrites it instead of keeping it
        as the previous one."""
        self.aligner: AuxAligner | None = None
        self.sae: VLSAE | None = None
        self.since_fired: Tensor | None = None
        self.dead_after = 0
        self.resample_every = 0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    # ----------------------------------------------------------------------------- data
    def _epoch_order(self, stage: str, epoch: int) -> Tensor:
        seed = self.config.seed * 1_000_003 + STAGES.index(stage) * 10_007 + epoch
        return torch.randperm(len(self.train_rows), generator=torch.Generator().manual_seed(seed))

    def _batch(self, stage: _Stage, step: int, order_cache: dict) -> tuple[Tensor, Tensor]:
        """This process's slice of global batch ``step`` of ``stage``."""
        epoch, position = divmod(step, stage.steps_per_epoch)
        if order_cache.get("epoch") != epoch:
            order_cache.update(epoch=epoch, order=self._epoch_order(stage.name, epoch))
        rows = order_cache["order"][position * stage.batch_size:(position + 1) * stage.batch_size]
        rows = self.train_rows[rows]
        acc = self.accelerator
        rows = rows[acc.process_index::acc.num_processes]
        vision, text = self.store.get(rows)
        return vision.to(self.device, non_blocking=True), text.to(self.device, non_blocking=True)

    # ----------------------------------------------------------------------------- stages
    def _make_stage(self, name: str, objective: nn.Module, optimizer: torch.optim.Optimizer, settings: AlignerConfig | SAEConfig
                    ) -> _Stage:
        batch_size = min(settings.batch_size, len(self.train_rows))
        if batch_size < self.accelerator.num_processes:
            raise ValueError(f"batch of {batch_size} cannot be split over "
                             f"{self.accelerator.num_processes} processes")
        steps_per_epoch = len(self.train_rows) // batch_size
        total = steps_per_epoch * settings.epochs
        warmup = round(settings.warmup_epochs * steps_per_epoch)
        objective, optimizer = self.accelerator.prepare(objective, optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_lambda(s, warmup, total, settings.schedule))
        return _Stage(name, objective, optimizer, scheduler, batch_size, steps_per_epoch, total)

    def _train_step(self, stage: _Stage, vision: Tensor, text: Tensor) -> dict[str, Tensor]:
        if stage.name == "aligner":
            out = stage.objective(vision, text)
        else:
            if self.aligner is not None:
                with torch.no_grad():
                    vision = self.aligner.project(vision, "vision")
                    text = self.aligner.project(text, "text")
            dead = self.since_fired >= self.dead_after
            out = stage.objective(vision, text, dead)
            fired = torch.zeros(self.sae.h, device=self.device)
            fired[out.pop("indices").reshape(-1)] = 1
            fired = self.accelerator.reduce(fired, "sum")
            self.since_fired += stage.batch_size
            self.since_fired[fired > 0] = 0
            out["dead_fraction"] = dead.float().mean()
        self.accelerator.backward(out["loss"])
        stage.optimizer.step()
        stage.scheduler.step()
        stage.optimizer.zero_grad(set_to_none=True)
        return {k: v.detach().float() for k, v in out.items()}

    def _val_loss(self, stage: _Stage) -> float:
        """The stage's loss on one batch of held-out rows, beside the training loss in the log
        and in curves.png: the gap says whether a stage overfits. Every process takes its slice
        (the aligner's InfoNCE gathers the batch across processes); no gradient, no state
        changes, so exact resume is unaffected."""
        acc = self.accelerator
        rows = self.val_rows[:stage.batch_size][acc.process_index::acc.num_processes]
        vision, text = (x.to(self.device) for x in self.store.get(rows))
        objective = acc.unwrap_model(stage.objective)
        with torch.no_grad(), acc.autocast():
            if stage.name == "aligner":
                return float(objective(vision, text)["loss"])
            if self.aligner is not None:
                vision = self.aligner.project(vision, "vision")
                text = self.aligner.project(text, "text")
            return float(objective(vision, text, self.since_fired >= self.dead_after)["loss"])

    def _run(self, stage: _Stage, start_step: int) -> None:
        config, acc = self.config, self.accelerator
        order_cache: dict = {}
        sums: dict[str, Tensor] = {}
        count = 0
        bar = tqdm(total=stage.total_steps, initial=start_step, desc=stage.name, unit="step",
                   disable=not acc.is_main_process)
        for step in range(start_step, stage.total_steps):
            vision, text = self._batch(stage, step, order_cache)
            stats = self._train_step(stage, vision, text)
            for key, value in stats.items():
                sums[key] = sums.get(key, 0) + value
            count += 1
            done = step + 1
            if done % config.log_every == 0 or done == stage.total_steps:
                record = {"stage": stage.name, "step": done,
                          "epoch": done / stage.steps_per_epoch,
                          "lr": stage.scheduler.get_last_lr()[0],
                          **{k: float(v) / count for k, v in sums.items()}}
                sums, count = {}, 0
                record["val_loss"] = self._val_loss(stage)
                if acc.is_main_process:
                    with (self.out / LOG_FILE).open("a") as f:
                        f.write(json.dumps(record) + "\n")
                log.info("%s step %d/%d: %s", stage.name, done, stage.total_steps,
                         ", ".join(f"{k}={v:.4g}" for k, v in record.items()
                                   if isinstance(v, float)))
                bar.set_postfix(loss=f"{record['loss']:.4g}")
            if stage.name == "sae" and self.resample_every and done % self.resample_every == 0 \
                    and done <= stage.total_steps - stage.steps_per_epoch:
                self._resample(stage, done)
            if done % config.checkpoint_every == 0 or done == stage.total_steps:
                self._save_checkpoint(stage, done)
            bar.update(1)
        bar.close()

    @torch.no_grad()
    def _resample(self, stage: _Stage, step: int) -> None:
        """Re-aim dead concepts at the worst-reconstructed pairs of a batch that is a pure
        function of (seed, step), so every process (and a resumed run) does the same."""
        dead = (self.since_fired >= self.dead_after).nonzero()[:, 0]
        if len(dead) == 0:
            return
        g = torch.Generator().manual_seed(self.config.seed * 7919 + step)
        rows = self.train_rows[torch.randperm(len(self.train_rows), generator=g)[
            :max(stage.batch_size, len(dead))]]
        vision, text = (x.to(self.device) for x in self.store.get(rows))
        if self.aligner is not None:
            vision = self.aligner.project(vision, "vision")
            text = self.aligner.project(text, "text")
        sae = self.sae
        residual = [x - reconstruct(sae, x, m) for x, m in ((vision, "vision"), (text, "text"))]
        error = residual[0].pow(2).sum(1) + residual[1].pow(2).sum(1)
        live = torch.ones(sae.h, dtype=torch.bool, device=self.device)
        live[dead] = False
        dead = dead[:len(error)]  # a small dataset revives the rest next time
        worst = error.topk(len(dead)).indices
        # aim at the worst pair; decoder columns along its residuals at a fifth of the live
        # columns' norm, so that rows the new concept captures lose little (Anthropic's 0.2)
        for dec, res in zip((sae.vision_decoder, sae.text_decoder), residual):
            scale = 0.2 * dec.weight[:, live].norm(dim=0).mean() if live.any() else 1.0
            dec.weight[:, dead] = (F.normalize(res[worst], dim=1) * scale).T
        pair = F.normalize(vision[worst], dim=1) + F.normalize(text[worst], dim=1)
        norm = sae.concepts[live].norm(dim=1).mean() if live.any() else 1.0
        sae.concepts[dead] = F.normalize(pair, dim=1) * norm
        state = stage.optimizer.state
        for param, index in ((sae.concepts, (dead,)), (sae.vision_decoder.weight, (slice(None),
                             dead)), (sae.text_decoder.weight, (slice(None), dead))):
            for buffer in ("exp_avg", "exp_avg_sq"):
                if buffer in state.get(param, {}):
                    state[param][buffer][index] = 0
        self.since_fired[dead] = 0
        log.info("resampled %d dead concepts at step %d", len(dead), step)

    # ----------------------------------------------------------------------------- state
    def _save_checkpoint(self, stage: _Stage, step: int) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        state = {"stage": stage.name, "step": step,
                 "model": acc.unwrap_model(stage.objective).state_dict(),
                 "optimizer": stage.optimizer.state_dict(),
                 "scheduler": stage.scheduler.state_dict(),
                 "since_fired": self.since_fired, "config": _identity(self.config),
                 "data": self._data_fingerprint(),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                         else []}}
        tmp, path = self.out / f".{CHECKPOINT}.tmp", self.out / CHECKPOINT
        with tmp.open("wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        if path.is_file() and not self.newest_torn:
            os.replace(path, self.out / PREVIOUS_CHECKPOINT)
        os.replace(tmp, path)
        self.newest_torn = False

    def _data_fingerprint(self) -> dict:
        """Shard names and sizes and the pair count: the split and every batch depend on them,
        so a run resumed on changed data would silently train on another split."""
        return {"pairs": len(self.store),
                "files": [[path.name, path.stat().st_size] for path in self.store.files]}

    def _read_checkpoint(self) -> dict | None:
        """The newest readable checkpoint (``checkpoint.pt``, else ``checkpoint.prev.pt`` with a
        warning), or None if there is none."""
        errors = []
        for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
            path = self.out / name
            if not path.is_file():
                continue
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # noqa: BLE001 - torn: zip, pickle or EOF errors
                errors.append(f"{path} ({error})")
                self.newest_torn |= name == CHECKPOINT
                log.warning("%s is unreadable (%s); trying the previous checkpoint", path, error)
                continue
            if errors or name == PREVIOUS_CHECKPOINT:
                log.warning("resuming from the previous checkpoint %s", path)
            return state
        if errors:
            raise RuntimeError(f"no readable checkpoint in {self.out}: {'; '.join(errors)}. "
                               f"Delete {CHECKPOINT} and {PREVIOUS_CHECKPOINT} there to restart "
                               f"the unfinished stage (a finished {ALIGNER_FILE} is kept), or "
                               "train into a new --out")
        return None

    def _check_resumable(self) -> None:
        """A checkpoint (and the aligner beside it) is only reused under the same config and
        on the same data."""
        state = self.resume_state
        if state is None:
            return
        now = _identity(self.config)
        if state["config"] != now:
            changed = sorted(k for k in now if state["config"].get(k) != now[k])
            raise ValueError(f"the checkpoint in {self.out} was written with a different config "
                             f"(changed: {changed}); use a new --out folder or --no-resume")
        saved = state.get("data")  # None: written before fingerprints were
        if saved is not None and saved != self._data_fingerprint():
            raise ValueError(f"the data in {self.config.data} changed since the checkpoint in "
                             f"{self.out} was written (shard files, sizes or pair count differ), "
                             "so resuming would train on another split: restore the data, or "
                             "use a new --out folder or --no-resume")

    def _load_checkpoint(self, stage: _Stage) -> int:
        """Restore ``stage`` from the checkpoint if it belongs to it; returns the step."""
        state, self.resume_state = self.resume_state, None  # a later stage starts afresh
        if state is None or state["stage"] != stage.name:
            self._trim_log(stage.name, 0)
            return 0
        self.accelerator.unwrap_model(stage.objective).load_state_dict(state["model"])
        stage.optimizer.load_state_dict(state["optimizer"])
        stage.scheduler.load_state_dict(state["scheduler"])
        if state["since_fired"] is not None:
            self.since_fired = state["since_fired"].to(self.device)
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self._trim_log(stage.name, state["step"])
        log.info("resumed %s at step %d", stage.name, state["step"])
        return state["step"]

    def _trim_log(self, stage: str, step: int) -> None:
        """Drop log records written after the point a stage (re)starts from."""
        if self.accelerator.is_main_process:
            _trim_log(self.out / LOG_FILE, stage, step)

    # ----------------------------------------------------------------------------- fit
    def fit(self) -> dict:
        """Train (resuming where possible), evaluate on the held-out split, save the space; the
        run folder stays locked meanwhile, so a second trainer cannot interleave with this one."""
        acc = self.accelerator
        self.out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.out / LOCK_FILE, timeout=0)
        if acc.is_main_process:
            try:
                lock.acquire()
            except Timeout:
                raise RuntimeError(f"{self.out} is in use by another trainer (it holds "
                                   f"{self.out / LOCK_FILE}); wait for it to finish or train "
                                   "into another --out") from None
        try:
            return self._fit()
        finally:
            lock.release()

    def _fit(self) -> dict:
        """``fit`` under the lock."""
        config, acc = self.config, self.accelerator
        if not config.resume:
            for name in (CHECKPOINT, PREVIOUS_CHECKPOINT, ALIGNER_FILE, LOG_FILE):
                (self.out / name).unlink(missing_ok=True)
        self.resume_state = self._read_checkpoint()
        self._check_resumable()
        log.info("%d training / %d held-out pairs, d=%d, site=%s, aligner=%s, %d process(es)",
                 len(self.train_rows), len(self.val_rows), self.d, self.manifest["site"],
                 self.use_aligner, acc.num_processes)
        if self.use_aligner:
            self.aligner = self._fit_aligner()
        self._fit_sae()
        return self._finish()

    def _fit_aligner(self) -> AuxAligner:
        path = self.out / ALIGNER_FILE
        torch.manual_seed(self.config.seed)
        aligner = AuxAligner(self.d)
        if self.config.resume and path.is_file():
            try:
                aligner.load_state_dict(load_file(str(path)))
            except Exception as error:  # torn by a crash or a full disk
                raise RuntimeError(f"{path} is unreadable ({error}); delete it to retrain the "
                                   "aligner (the SAE then restarts too), or train into a new "
                                   "--out") from error
            log.info("aligner already trained: %s", path)
        else:
            settings = self.config.aligner
            optimizer = torch.optim.AdamW(aligner.parameters(), lr=settings.lr,
                                          weight_decay=settings.weight_decay, fused=True)
            stage = self._make_stage("aligner", AlignerObjective(
                aligner, settings.temperature, settings.normalize, settings.pair_weight),
                                     optimizer, settings)
            self._run(stage, self._load_checkpoint(stage))
            aligner = self.accelerator.unwrap_model(stage.objective).aligner
            if self.accelerator.is_main_process:
                tmp = self.out / f".{ALIGNER_FILE}.tmp"
                save_file({k: v.detach().cpu().contiguous() for k, v in
                           aligner.state_dict().items()}, str(tmp))
                os.replace(tmp, path)
            self.accelerator.wait_for_everyone()
        aligner = aligner.to(self.device).eval()
        aligner.requires_grad_(False)
        return aligner

    def _fit_sae(self) -> None:
        settings: SAEConfig = self.config.sae
        h = settings.expansion * self.d
        torch.manual_seed(self.config.seed + 1)
        sae = VLSAE(self.d, h, settings.k)
        self._init_decoder_biases(sae)
        self.since_fired = torch.zeros(h, dtype=torch.long, device=self.device)
        self.dead_after = settings.dead_after or min(len(self.train_rows), 10_000_000)
        steps_per_epoch = len(self.train_rows) // min(settings.batch_size, len(self.train_rows))
        self.resample_every = (max(1, round(settings.resample_epochs * steps_per_epoch))
                               if settings.resample_epochs > 0 else 0)
        optimizer = torch.optim.Adam(sae.parameters(), lr=settings.lr, fused=True)
        objective = SAEObjective(sae, settings.auxk_coef, settings.k_aux)
        stage = self._make_stage("sae", objective, optimizer, settings)
        self.sae = sae
        self._run(stage, self._load_checkpoint(stage))
        self.sae = self.accelerator.unwrap_model(stage.objective).sae.eval()

    @torch.no_grad()
    def _init_decoder_biases(self, sae: VLSAE) -> None:
        """Start each decoder bias at its modality's mean (of up to 8192 training rows): LLaVA
        activations sit far from the origin, and the reference's zero-centred default spends
        its first many steps just moving the bias there."""
        vision, text = self.store.get(self.train_rows[:8192])
        if self.aligner is not None:
            vision = self.aligner.project(vision.to(self.device), "vision")
            text = self.aligner.project(text.to(self.device), "text")
        sae.vision_decoder.bias.copy_(vision.mean(0))
        sae.text_decoder.bias.copy_(text.mean(0))

    def _finish(self) -> dict:
        acc = self.accelerator
        metrics = {}
        if acc.is_main_process:
            self.build_space().save_pretrained(self.out / "space")  # kept if the metrics fail
            metrics = evaluate(self.sae, self.aligner, self.store, self.val_rows,
                               self.config.sae.batch_size, self.device)
            sample = torch.cat([self.val_rows, self.train_rows[:100_000]])
            metrics["dead_fraction"] = dead_fraction(self.sae, self.aligner, self.store, sample,
                                                     self.config.sae.batch_size, self.device)
            metrics["dead_fraction_tracker"] = float((self.since_fired >= self.dead_after)
                                                     .float().mean())
            metrics.update(n_train=len(self.train_rows), steps=self._total_steps())
            write_json(self.out / "metrics.json", metrics)
            log.info("explained variance vision %.4f text %.4f, dead %.4f, agreement matched "
                     "%.3f vs shuffled %.3f; space saved to %s",
                     metrics["explained_variance"]["vision"],
                     metrics["explained_variance"]["text"], metrics["dead_fraction"],
                     metrics["concept_agreement"]["matched"],
                     metrics["concept_agreement"]["shuffled"], self.out / "space")
        acc.wait_for_everyone()
        return metrics

    def _total_steps(self) -> dict:
        n = len(self.train_rows)
        out = {}
        for name, settings in (("aligner", self.config.aligner), ("sae", self.config.sae)):
            if name == "sae" or self.use_aligner:
                out[name] = n // min(settings.batch_size, n) * settings.epochs
        return out

    def build_space(self) -> VLSAESpace:
        """The trained modules as a ``VLSAESpace`` whose config records where they belong."""
        m = self.manifest
        config = SpaceConfig(
            kind="vlsae", d_model=self.d, n_concepts=self.sae.h, k=self.sae.k,
            model_name=m["model"], model_type=m["model_type"], site=m["site"],
            layer=m["layer"], has_aligner=self.aligner is not None, source="vlsae",
            extra={"training": self.config.to_dict(),
                   "data": {"count": m["count"], "prompt": m.get("prompt"),
                            "n_train": len(self.train_rows), "n_val": len(self.val_rows)}})
        aligner = self.aligner
        if aligner is not None:
            aligner = AuxAligner(self.d)
            aligner.load_state_dict({k: v.cpu() for k, v in self.aligner.state_dict().items()})
        sae = VLSAE(self.d, self.sae.h, self.sae.k)
        sae.load_state_dict({k: v.cpu() for k, v in self.sae.state_dict().items()})
        return VLSAESpace(sae, aligner, config)


def _identity(config: TrainConfig) -> dict:
    """The config fields a checkpoint is only valid for (not logging / resume switches)."""
    return {k: v for k, v in config.to_dict().items()
            if k not in ("resume", "checkpoint_every", "log_every")}


def _trim_log(path: Path, stage: str, step: int) -> None:
    """Keep the log records up to (``stage``, ``step``); a last line torn by a kill is dropped
    with a warning."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path} line {number} is not JSON: fix or delete that line, "
                                 "or use --no-resume") from None
            log.warning("dropping the torn last line of %s: %r", path, line)
            continue
        if (STAGES.index(record["stage"]), record["step"]) <= (STAGES.index(stage), step):
            keep.append(line)
    atomic_write_bytes(path, "".join(f"{line}\n" for line in keep).encode())


def train(config: TrainConfig) -> dict:
    """Train (or resume) and return the metrics also written to ``out/metrics.json``."""
    from sae_training.logs import setup_logging

    trainer = Trainer(config)
    setup_logging(Path(config.out), "train", trainer.accelerator.process_index)
    return trainer.fit()
