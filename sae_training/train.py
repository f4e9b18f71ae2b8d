"""Learn a VL-SAE concept space from extracted activations: aligner first (LLaVA), then the SAE.

Runs the same under plain ``python`` (CPU or one GPU) and ``accelerate launch`` (many GPUs: each
process takes a slice of every global batch; gradients are averaged by DDP). Every
``checkpoint_every`` steps the run's state is checkpointed (``checkpoint``); batches are a pure
function of (seed, stage, epoch, step) (``data_split``), so a killed run that resumes ends where
an uninterrupted one does. A lock on the run folder keeps a second trainer out of it. What a
finished run leaves (the space, ``metrics.json``) is ``results``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_training.checkpoint import (
    ALIGNER_FILE,
    CHECKPOINT,
    LOG_FILE,
    PREVIOUS_CHECKPOINT,
    CheckpointFiles,
    LogWindow,
    check_resumable,
    config_identity,
    load_aligner,
    locked_run_folder,
    restore_rng,
    rng_state,
    save_aligner,
    trim_log,
)
from sae_training.config import SAEConfig, TrainConfig
from sae_training.data_split import DataSplit
from sae_training.dead_concepts import DeadConcepts, revive
from sae_training.distributed import make_accelerator
from sae_training.losses import AlignerObjective, SAEObjective
from sae_training.results import save_results
from sae_training.stages import Stage, make_stage, steps_per_epoch
from vlsae_hooks.spaces import VLSAE, AuxAligner

log = logging.getLogger(__name__)


class Trainer:
    """Holds the data split and the accelerator; ``fit()`` runs (or resumes) both stages."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.accelerator = make_accelerator(config.mixed_precision)
        self.out = Path(config.out)
        self.data = DataSplit(config)
        self.use_aligner = (config.use_aligner if config.use_aligner is not None
                            else self.data.store.manifest["site"] != "clip_embeds")
        self.d = self.data.store.d
        h = config.sae.expansion * self.d
        if config.sae.k > h:
            raise ValueError(f"k={config.sae.k} exceeds the number of concepts h={h} "
                             f"({config.sae.expansion} x d={self.d}); lower --sae-k or raise "
                             "--sae-expansion")
        self.checkpoints = CheckpointFiles(self.out)
        self.resume_state: dict | None = None
        self.aligner: AuxAligner | None = None
        self.sae: VLSAE | None = None
        self.dead: DeadConcepts | None = None
        self.resample_every = 0
        self._window = LogWindow()
        """The log window a resumed stage goes on with (``_load_checkpoint``)."""

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def _aligned(self, vision: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """The pair as the SAE sees it: through the aligner when there is one."""
        if self.aligner is None:
            return vision, text
        return self.aligner.project(vision, "vision"), self.aligner.project(text, "text")

    # ----------------------------------------------------------------------------- stages
    def _batch(self, stage: Stage, step: int, order_cache: dict) -> tuple[Tensor, Tensor]:
        """This process's slice of global batch ``step`` of ``stage``."""
        acc = self.accelerator
        rows = self.data.batch_rows(stage, step, order_cache)
        rows = rows[acc.process_index::acc.num_processes]
        vision, text = self.data.store.get(rows)
        return vision.to(self.device, non_blocking=True), text.to(self.device, non_blocking=True)

    def _train_step(self, stage: Stage, vision: Tensor, text: Tensor) -> dict[str, Tensor]:
        if stage.name == "aligner":
            out = stage.objective(vision, text)
        else:
            with torch.no_grad():
                vision, text = self._aligned(vision, text)
            dead = self.dead.mask()
            out = stage.objective(vision, text, dead)
            fired = torch.zeros(self.sae.h, device=self.device)
            fired[out.pop("indices").reshape(-1)] = 1
            self.dead.record(self.accelerator.reduce(fired, "sum"), stage.batch_size)
            out["dead_fraction"] = dead.float().mean()
        self.accelerator.backward(out["loss"])
        stage.optimizer.step()
        stage.scheduler.step()
        stage.optimizer.zero_grad(set_to_none=True)
        return {k: v.detach().float() for k, v in out.items()}

    def _val_loss(self, stage: Stage) -> float:
        """The stage's loss on one batch of held-out rows, beside the training loss in the log
        and in curves.png: the gap says whether a stage overfits. Every process takes its slice
        (the aligner's InfoNCE gathers the batch across processes); no gradient, no state
        changes, so exact resume is unaffected."""
        acc = self.accelerator
        rows = self.data.val_rows[:stage.batch_size][acc.process_index::acc.num_processes]
        vision, text = (x.to(self.device) for x in self.data.store.get(rows))
        objective = acc.unwrap_model(stage.objective)
        with torch.no_grad(), acc.autocast():
            if stage.name == "aligner":
                return float(objective(vision, text)["loss"])
            vision, text = self._aligned(vision, text)
            return float(objective(vision, text, self.dead.mask())["loss"])

    def _run(self, stage: Stage, start_step: int) -> None:
        config, acc = self.config, self.accelerator
        order_cache: dict = {}
        window, self._window = self._window, LogWindow()  # a later stage starts its own
        bar = tqdm(total=stage.total_steps, initial=start_step, desc=stage.name, unit="step",
                   disable=not acc.is_main_process)
        for step in range(start_step, stage.total_steps):
            vision, text = self._batch(stage, step, order_cache)
            window.add(self._train_step(stage, vision, text))
            done = step + 1
            if done % config.log_every == 0 or done == stage.total_steps:
                record = {"stage": stage.name, "step": done,
                          "epoch": done / stage.steps_per_epoch,
                          "lr": stage.scheduler.get_last_lr()[0],
                          **window.close()}
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
                self._save_checkpoint(stage, done, window)
            bar.update(1)
        bar.close()

    @torch.no_grad()
    def _resample(self, stage: Stage, step: int) -> None:
        """Re-aim dead concepts at the worst-reconstructed pairs of a batch that is a pure
        function of (seed, step), so every process (and a resumed run) does the same."""
        dead = self.dead.mask().nonzero()[:, 0]
        if len(dead) == 0:
            return
        g = torch.Generator().manual_seed(self.config.seed * 7919 + step)
        rows = self.data.train_rows[torch.randperm(len(self.data.train_rows), generator=g)[
            :max(stage.batch_size, len(dead))]]
        vision, text = self._aligned(*(x.to(self.device) for x in self.data.store.get(rows)))
        dead = revive(self.sae, stage.optimizer, dead, vision, text)
        self.dead.since_fired[dead] = 0
        log.info("resampled %d dead concepts at step %d", len(dead), step)

    # ----------------------------------------------------------------------------- state
    def _save_checkpoint(self, stage: Stage, step: int, window: LogWindow) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        self.checkpoints.write({
            "stage": stage.name, "step": step,
            "model": acc.unwrap_model(stage.objective).state_dict(),
            "optimizer": stage.optimizer.state_dict(), "scheduler": stage.scheduler.state_dict(),
            "since_fired": self.dead.since_fired if self.dead is not None else None,
            "config": config_identity(self.config.to_dict()), "data": self.data.fingerprint(),
            "rng": rng_state(),
            "log_window": window.state()})

    def _load_checkpoint(self, stage: Stage) -> int:
        """Restore ``stage`` from the checkpoint if it belongs to it; returns the step."""
        state, self.resume_state = self.resume_state, None  # a later stage starts afresh
        if state is None or state["stage"] != stage.name:
            self._trim_log(stage.name, 0)
            return 0
        self.accelerator.unwrap_model(stage.objective).load_state_dict(state["model"])
        stage.optimizer.load_state_dict(state["optimizer"])
        stage.scheduler.load_state_dict(state["scheduler"])
        if state["since_fired"] is not None:
            self.dead.since_fired = state["since_fired"].to(self.device)
        restore_rng(state["rng"])
        self._window = LogWindow.from_state(state.get("log_window"), self.device)
        self._trim_log(stage.name, state["step"])
        log.info("resumed %s at step %d", stage.name, state["step"])
        return state["step"]

    def _trim_log(self, stage: str, step: int) -> None:
        """Drop log records written after the point a stage (re)starts from."""
        if self.accelerator.is_main_process:
            trim_log(self.out / LOG_FILE, stage, step)

    # ----------------------------------------------------------------------------- fit
    def fit(self) -> dict:
        """Train (resuming where possible), evaluate on the held-out split, save the space; the
        run folder stays locked meanwhile, so a second trainer cannot interleave with this one."""
        self.out.mkdir(parents=True, exist_ok=True)
        with locked_run_folder(self.out, self.accelerator.is_main_process):
            return self._fit()

    def _fit(self) -> dict:
        """``fit`` under the lock."""
        config, acc = self.config, self.accelerator
        if not config.resume:
            for name in (CHECKPOINT, PREVIOUS_CHECKPOINT, ALIGNER_FILE, LOG_FILE):
                (self.out / name).unlink(missing_ok=True)
        self.resume_state = self.checkpoints.read()
        if self.resume_state is not None:
            check_resumable(self.resume_state, config, self.data.fingerprint(), self.out)
        log.info("%d training / %d held-out pairs, d=%d, site=%s, aligner=%s, %d process(es)",
                 len(self.data.train_rows), len(self.data.val_rows), self.d,
                 self.data.store.manifest["site"], self.use_aligner, acc.num_processes)
        if self.use_aligner:
            self.aligner = self._fit_aligner()
        self._fit_sae()
        return self._finish()

    def _fit_aligner(self) -> AuxAligner:
        path = self.out / ALIGNER_FILE
        torch.manual_seed(self.config.seed)
        aligner = AuxAligner(self.d)
        if self.config.resume and path.is_file():
            load_aligner(aligner, path)
            log.info("aligner already trained: %s", path)
        else:
            settings = self.config.aligner
            optimizer = torch.optim.AdamW(aligner.parameters(), lr=settings.lr,
                                          weight_decay=settings.weight_decay, fused=True)
            objective = AlignerObjective(aligner, settings.temperature, settings.normalize,
                                         settings.pair_weight)
            stage = make_stage(self.accelerator, "aligner", objective, optimizer, settings,
                               len(self.data.train_rows))
            self._run(stage, self._load_checkpoint(stage))
            aligner = self.accelerator.unwrap_model(stage.objective).aligner
            if self.accelerator.is_main_process:
                save_aligner(aligner, path)
            self.accelerator.wait_for_everyone()
        aligner = aligner.to(self.device).eval()
        aligner.requires_grad_(False)
        return aligner

    def _fit_sae(self) -> None:
        settings: SAEConfig = self.config.sae
        h, n_train = settings.expansion * self.d, len(self.data.train_rows)
        torch.manual_seed(self.config.seed + 1)
        sae = VLSAE(self.d, h, settings.k)
        self._init_decoder_biases(sae)
        self.dead = DeadConcepts(h, settings.dead_after or min(n_train, 10_000_000), self.device)
        self.resample_every = (max(1, round(settings.resample_epochs
                                            * steps_per_epoch(settings, n_train)))
                               if settings.resample_epochs > 0 else 0)
        optimizer = torch.optim.Adam(sae.parameters(), lr=settings.lr, fused=True)
        objective = SAEObjective(sae, settings.auxk_coef, settings.k_aux)
        stage = make_stage(self.accelerator, "sae", objective, optimizer, settings, n_train)
        self.sae = sae
        self._run(stage, self._load_checkpoint(stage))
        self.sae = self.accelerator.unwrap_model(stage.objective).sae.eval()

    @torch.no_grad()
    def _init_decoder_biases(self, sae: VLSAE) -> None:
        """Start each decoder bias at its modality's mean (of up to 8192 training rows): LLaVA
        activations sit far from the origin, and the reference's zero-centred default spends
        its first many steps just moving the bias there."""
        vision, text = self.data.store.get(self.data.train_rows[:8192])
        if self.aligner is not None:
            vision, text = self._aligned(vision.to(self.device), text.to(self.device))
        sae.vision_decoder.bias.copy_(vision.mean(0))
        sae.text_decoder.bias.copy_(text.mean(0))

    def _finish(self) -> dict:
        metrics = {}
        if self.accelerator.is_main_process:
            metrics = save_results(self.out, self.sae, self.aligner, self.config, self.data,
                                   self.dead, self.device)
        self.accelerator.wait_for_everyone()
        return metrics


def train(config: TrainConfig) -> dict:
    """Train (or resume) and return the metrics also written to ``out/metrics.json``."""
    from sae_training.logs import setup_logging

    trainer = Trainer(config)
    setup_logging(Path(config.out), "train", trainer.accelerator.process_index)
    return trainer.fit()
