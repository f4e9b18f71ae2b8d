"""What a training run keeps in its folder so that a killed run resumes where it stopped.

``checkpoint.pt`` holds everything a restart needs (weights, optimizer, scheduler, RNG states,
the dead-concept counters, the stage and step, a fingerprint of the data) and is replaced
atomically; the one before it stays as ``checkpoint.prev.pt``, so a newest file torn by a crash
or a full disk falls back to it. On resume the log is trimmed back to the checkpoint's step, and
a checkpoint is only reused under the same config and on the same data. The finished aligner
waits beside the checkpoints, and a lock keeps a second trainer out of the folder.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file
from torch import Tensor

from sae_training.config import TrainConfig
from sae_training.samples import is_remote
from sae_training.stages import STAGES
from sae_training.store import atomic_write_bytes
from vlsae_hooks.spaces import AuxAligner
from vlsae_hooks.tensor_files import save_tensors_atomically

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
ALIGNER_FILE = "aligner.safetensors"
"""The finished aligner: the SAE stage that follows resumes beside it."""
LOG_FILE = "train_log.jsonl"
LOCK_FILE = ".lock"


def config_identity(config: dict) -> dict:
    """The fields of a trainer's config (``config.to_dict()``) that a checkpoint is only valid
    for: not the logging / resume switches, nor ``out`` (the checkpoint's own folder, however
    it is spelled), and ``data`` and local model folders as the places they name (``acts``,
    ``./acts/`` and its absolute path are one folder; the data's content is checked apart, by its
    fingerprint)."""
    identity = {k: _local_path(v) for k, v in config.items()
                if k not in ("resume", "checkpoint_every", "log_every", "out")}
    if isinstance(identity.get("data"), str):
        identity["data"] = _data_place(identity["data"])
    return identity


def _local_path(value):
    """A model named by a local folder (LexVLA's text model, backbone, VLM) as an absolute path,
    however it was spelled; a hub id, a number or a nested config's fields as they are."""
    if isinstance(value, dict):
        return {k: _local_path(v) for k, v in value.items()}
    if isinstance(value, str) and not is_remote(value) and os.path.exists(value):
        return os.path.abspath(value)
    return value


def _data_place(spec: str) -> str:
    """A local data path made absolute and normalised (no filesystem access); a hub dataset
    (``hf:NAME``), a URL or a ``pipe:`` as given."""
    return spec if spec.startswith("hf:") or is_remote(spec) else os.path.abspath(spec)


def config_changes(saved: dict, config: dict) -> list[str]:
    """The identity fields (``config_identity``) in which a checkpoint's ``saved`` config and a
    run's ``config`` (``to_dict()``) differ; a checkpoint written before ``out`` and ``data``
    were normalised compares as if written now."""
    saved, now = config_identity(saved), config_identity(config)
    return sorted(k for k in now.keys() | saved.keys() if saved.get(k) != now.get(k))


def rng_state() -> dict:
    """The torch, Python and CUDA random states: batches and resampling draw on them."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: dict) -> None:
    """Put back the random states ``rng_state`` took (a checkpoint of an older LexVLA trainer
    kept no CUDA states: its CUDA generators are left as they are)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class LogWindow:
    """The training statistics summed over the steps since the last log record. A checkpoint
    carries it (``state``, ``from_state``), so a resumed run's next record averages the same
    steps as an uninterrupted run's."""

    sums: dict[str, float | Tensor] = field(default_factory=dict)
    """Statistic -> its sum: a float, or a 0-d tensor left on the device (no host read a
    step)."""
    count: int = 0
    """Steps summed."""

    def add(self, stats: Mapping[str, float | Tensor]) -> None:
        """Sum one step's statistics in."""
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0) + value
        self.count += 1

    def close(self) -> dict[str, float]:
        """The window's means, as a log record holds them; the next window starts empty."""
        means = {key: float(value) / self.count for key, value in self.sums.items()}
        self.sums, self.count = {}, 0
        return means

    def state(self) -> dict:
        """What a checkpoint holds of it (tensors on the CPU)."""
        return {"count": self.count,
                "sums": {key: value.cpu() if isinstance(value, Tensor) else value
                         for key, value in self.sums.items()}}

    @classmethod
    def from_state(cls, state: dict | None, device: torch.device | None = None) -> LogWindow:
        """The window a checkpoint holds (its tensors onto ``device``); empty for None (a
        checkpoint written before it carried one)."""
        if state is None:
            return cls()
        return cls({key: value.to(device) if isinstance(value, Tensor) else value
                    for key, value in state["sums"].items()}, state["count"])


class CheckpointFiles:
    """The newest and the previous checkpoint of one run folder."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.newest_torn = False
        """``checkpoint.pt`` was unreadable: the next save overwrites it instead of keeping it
        as the previous one."""

    def write(self, state: dict) -> None:
        """Replace the newest checkpoint with ``state`` (written and synced in full first),
        keeping the one it replaces as the previous."""
        tmp, path = self.out / f".{CHECKPOINT}.tmp", self.out / CHECKPOINT
        with tmp.open("wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        if path.is_file() and not self.newest_torn:
            os.replace(path, self.out / PREVIOUS_CHECKPOINT)
        os.replace(tmp, path)
        self.newest_torn = False

    def read(self) -> dict | None:
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


def check_resumable(state: dict, config: TrainConfig, data_fingerprint: dict, out: Path) -> None:
    """A checkpoint (and the aligner beside it) is only reused under the same config and on
    the same data (``data_fingerprint``: now; ``state["data"]``: when it was written)."""
    changed = config_changes(state["config"], config.to_dict())
    if changed:
        raise ValueError(f"the checkpoint in {out} was written with a different config "
                         f"(changed: {changed}); use a new --out folder or --no-resume")
    saved = state.get("data")  # None: written before fingerprints were
    if saved is not None and saved != data_fingerprint:
        raise ValueError(f"the data in {config.data} changed since the checkpoint in "
                         f"{out} was written (shard files, sizes or pair count differ), "
                         "so resuming would train on another split: restore the data, or "
                         "use a new --out folder or --no-resume")


def trim_log(path: Path, stage: str, step: int) -> None:
    """Keep the log records up to (``stage``, ``step``)."""
    last = (STAGES.index(stage), step)
    trim_log_records(path, lambda r: (STAGES.index(r["stage"]), r["step"]) <= last)


def trim_log_records(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite a run's JSON-lines log (atomically) with the records ``keep`` accepts, as a run
    resuming from a checkpoint must; a last line torn by a kill is dropped with a warning."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path} line {number} is not JSON: fix or delete that line, "
                                 "or use --no-resume") from None
            log.warning("dropping the torn last line of %s: %r", path, line)
            continue
        if keep(record):
            kept.append(line)
    atomic_write_bytes(path, "".join(f"{line}\n" for line in kept).encode())


def save_aligner(aligner: AuxAligner, path: Path) -> None:
    """Write the finished aligner whole or not at all (a temporary file, then renamed)."""
    save_tensors_atomically({k: v.detach().cpu().contiguous()
                             for k, v in aligner.state_dict().items()}, path)


def load_aligner(aligner: AuxAligner, path: Path) -> None:
    """Load a finished aligner's weights into ``aligner``, naming the remedy if unreadable."""
    try:
        aligner.load_state_dict(load_file(str(path)))
    except Exception as error:  # torn by a crash or a full disk
        raise RuntimeError(f"{path} is unreadable ({error}); delete it to retrain the "
                           "aligner (the SAE then restarts too), or train into a new "
                           "--out") from error


class RunFolderInUse(TimeoutError):
    """Another trainer holds the run folder's lock: an ``OSError``, so the commands report it
    as a refused input (its message, exit status 2), not a traceback."""


@contextmanager
def locked_run_folder(out: Path, main_process: bool) -> Iterator[None]:
    """Hold ``out/.lock`` (the main process does) while a trainer works in ``out``, so that a
    second trainer cannot interleave with it."""
    lock = FileLock(out / LOCK_FILE, timeout=0)
    if main_process:
        try:
            lock.acquire()
        except Timeout:
            raise RunFolderInUse(f"{out} is in use by another trainer (it holds "
                               f"{out / LOCK_FILE}); wait for it to finish or train "
                               "into another --out") from None
    try:
        yield
    finally:
        lock.release()
