"""What lets ``vlsae toy train`` go on where it stopped: the stages of a training folder finished
so far (``Stages``), and the progress of the one under way, saved every ``every`` steps
(``StageCheckpoint``). Both hold the settings they were made under: another run's are never
taken for this one's."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..reproduce.journal import atomic_write


def changed_settings(before: dict, now: dict) -> list[str]:
    """The names of the settings whose values differ."""
    return sorted(k for k in now if before.get(k) != now[k])


class Stages:
    """The stages of a training folder finished so far, each with the settings it was trained
    under (``stages.json``)."""

    FILE = "stages.json"
    ORDER = ("clip", "llava")
    """A stage trained anew voids the later ones (the LLaVA holds the tower it was trained on)."""

    def __init__(self, out: Path, settings: dict[str, dict], fresh: bool) -> None:
        """``settings``: each stage's, JSON-able (the machine's thread count and device are not
        settings); ``fresh``: retrain every stage, forgetting what was noted."""
        self.out, self.path, self.fresh = out, out / self.FILE, fresh
        self.settings = json.loads(json.dumps(settings))  # as it reads back
        noted = self.path.is_file()
        self.unnoted = not fresh and not noted
        """A folder trained before stages were noted: its whole stages are reused as they are."""
        self.done: dict = json.loads(self.path.read_text()) if noted and not fresh else {}
        if fresh:  # forgotten on disk too: a fresh run killed midway is not the old folder
            atomic_write(self.path, json.dumps(self.done))

    def reuse(self, stage: str, folder: Path) -> bool:
        """Whether ``stage``'s finished folder is to be loaded instead of trained again."""
        if self.fresh or not (folder / "model.safetensors").is_file():
            return False
        if self.unnoted:
            warnings.warn(f"reusing {folder}, whose training settings were not noted, as "
                          "trained under these; pass --fresh to retrain it", stacklevel=3)
            self.finished(stage)
            return True
        trained = self.done.get(stage)
        if trained is None:  # killed while saving it: not whole
            return False
        changed = changed_settings(trained, self.settings[stage])
        if changed:
            raise ValueError(f"{folder} was trained under other settings (changed: {changed}); "
                             "pass --fresh to retrain it, or train into another --out")
        return True

    def finished(self, stage: str) -> None:
        """Note ``stage`` as whole, trained under this run's settings, and the later stages as
        not (``ORDER``); its checkpoint is no longer needed."""
        later = self.ORDER[self.ORDER.index(stage) + 1:]
        self.done = {**{k: v for k, v in self.done.items() if k not in later},
                     stage: self.settings[stage]}
        atomic_write(self.path, json.dumps(self.done, indent=2))
        self.checkpoint(stage).path.unlink(missing_ok=True)

    def checkpoint(self, stage: str, every: int = 50) -> StageCheckpoint:
        """Where ``stage``'s progress is saved while it trains (``out/<stage>.checkpoint.pt``)."""
        return StageCheckpoint(self.out / f"{stage}.checkpoint.pt", self.settings[stage],
                               self.fresh, every)


class StageCheckpoint:
    """A training stage's modules, optimizer, step and random generators, written atomically
    every ``every`` steps: a killed stage goes on from its last save and ends with the same
    weights, bit for bit, as a run never stopped."""

    def __init__(self, path: Path, settings: dict, fresh: bool, every: int) -> None:
        self.path, self.settings, self.fresh, self.every = path, settings, fresh, every

    def resume(self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
               rng: np.random.Generator) -> int:
        """Load the saved progress into ``modules``, ``optimizer``, ``rng`` and torch's generator
        and return the step to go on from; 0 (nothing loaded) without a save or with ``fresh``.
        A save made under other settings is refused."""
        if self.fresh or not self.path.is_file():
            return 0
        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        changed = changed_settings(saved["settings"], self.settings)
        if changed:
            raise ValueError(f"{self.path} was saved under other settings (changed: {changed}); "
                             "pass --fresh to start the stage over, or train into another --out")
        for name, module in modules.items():
            module.load_state_dict(saved["modules"][name])
        optimizer.load_state_dict(saved["optimizer"])
        rng.bit_generator.state = saved["rng"]
        torch.set_rng_state(saved["torch_rng"])
        return saved["step"] + 1

    def save(self, step: int, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
             rng: np.random.Generator) -> None:
        """Save the progress after ``step`` when it ends a block of ``every`` steps."""
        if (step + 1) % self.every:
            return
        partial = self.path.with_suffix(".partial")
        torch.save({"step": step, "settings": self.settings, "rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(), "optimizer": optimizer.state_dict(),
                    "modules": {name: m.state_dict() for name, m in modules.items()}}, partial)
        os.replace(partial, self.path)
