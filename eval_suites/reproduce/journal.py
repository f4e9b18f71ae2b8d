"""Answers written as they come, so a killed evaluation resumes where it stopped.

A run's answers go to a JSONL file, one line per item, flushed and fsynced batch by batch.
Beside it, ``<name>.resume.json`` holds the settings the answers were made with, how many
lines count, the generation seconds so far, and the random generators' state after the last
counted batch. Reopened with the same settings, the log drops a torn last line (and any line
written after the last saved state), skips the answered ids, and restores the generators
before the first new batch: sampled answers, and so the final metrics, equal those of an
uninterrupted run. Different settings are refused rather than mixed into one set of answers, and
so is other code: the state records a hash of our packages' Python source and the torch and
transformers versions (``code_version``), which a resume must match.

Shared by ``eval_suites.reproduce`` (POPE, CHAIR) and the toy world's ``evaluate`` / ``compare``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Hashable
from functools import lru_cache
from importlib import import_module
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sae_training.store import atomic_write_bytes

log = logging.getLogger(__name__)

STATE_SUFFIX = ".resume.json"
PROGRESS_EVERY_S = 60.0
"""How often, at most, a run's log file says how far an ``answer`` call has got."""
CODE_PACKAGES = ("vlsae_hooks", "sae_training", "eval_suites")
"""Our packages, whose Python source makes a run's answers beside its settings."""
LIBRARIES = ("torch", "transformers")
"""The libraries whose versions a run's answers depend on (kernels, generation)."""


@lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """A hash of each of ``CODE_PACKAGES``' ``.py`` files (paths and contents) and the
    ``LIBRARIES``' versions: what a resumed run must match, since answers made by changed code
    would mix with the old ones unseen."""
    found = {}
    for name in CODE_PACKAGES:
        root = Path(import_module(name).__file__).parent
        digest = hashlib.sha256()
        for file in sorted(root.rglob("*.py")):
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
        found[name] = digest.hexdigest()[:16]
    return found | {library: version(library) for library in LIBRARIES}


def atomic_write(path: Path, data: str | bytes) -> None:
    """``sae_training.store.atomic_write_bytes`` for text too: no reader sees half a report."""
    atomic_write_bytes(Path(path), data.encode() if isinstance(data, str) else data)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and Python generators, as JSON."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {"torch": _b64(torch.get_rng_state()),
             "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
             "python": [version, list(internal), py_gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_tensor(state["torch"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_tensor(s) for s in state["cuda"]])


def batches(items: list, size: int) -> list[list]:
    """``items`` in batches of ``size``; with ``size`` > 1 a last batch of one joins the one
    before: methods that steer a row with another row's image (the wrong-image controls) need
    two rows. ``size`` 1 is kept as asked: one row at a time, as the reference runs."""
    cuts = list(range(0, len(items), size))
    if size > 1 and len(cuts) > 1 and len(items) - cuts[-1] == 1:
        cuts.pop()
    return [items[a:b] for a, b in zip(cuts, [*cuts[1:], len(items)])]


class Progress:
    """How far an ``answer`` call has got, for the run's log file (``eval_suites.run_log``):
    a line at most every ``PROGRESS_EVERY_S`` seconds with the time an item takes and the time
    left, and one at the end."""

    def __init__(self, desc: str, total: int) -> None:
        self.desc, self.total, self.count = desc, total, 0
        self.began = self.reported = time.perf_counter()

    def update(self, n: int) -> None:
        self.count += n
        now = time.perf_counter()
        if now - self.reported >= PROGRESS_EVERY_S and self.count < self.total:
            self.reported = now
            each = (now - self.began) / self.count
            log.info("%s: %d of %d answered, %.2f s each, about %s left", self.desc,
                     self.count, self.total, each, duration(each * (self.total - self.count)))

    def finished(self) -> None:
        log.info("%s: %d answered in %s", self.desc, self.count,
                 duration(time.perf_counter() - self.began))


def duration(seconds: float) -> str:
    """``seconds`` as a person reads it: 42 s, 7 min, 3.5 h."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 6000:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class AnswerLog:
    """The answers of one run, keyed by ``row[key]``; ``path`` None keeps them in memory only."""

    def __init__(self, path: Path | None, settings: dict | None = None, key: str = "id") -> None:
        self.path, self.key = path, key
        self.settings = json.loads(json.dumps(settings or {}))  # as it reads back from JSON
        self.rows: list[dict] = []
        self.done: dict[Hashable, dict] = {}
        self.seconds = 0.0
        self._rng: dict | None = None  # state to restore before the first new batch
        if path is None:
            return
        self.state_path = path.with_suffix(STATE_SUFFIX)
        if self.state_path.is_file():
            state = self._read_state()
            if state["answered"]:  # a run that answered nothing (it failed first) holds nothing
                self._check(state["settings"])  # to keep: the corrected command starts over
                self._check_code(state.get("code"))
            self.rows, self.seconds = self._read(state["answered"]), state["seconds"]
            self._rng = state["rng"] if self.rows else None
            if not self.rows:
                self._save_state()  # under this run's settings
        elif path.is_file() and path.stat().st_size:
            raise ValueError(f"{path} exists without {self.state_path.name}, so it cannot be "
                             "resumed; move it away (or use another output folder)")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._save_state()
            path.write_bytes(b"")
        self.done = {row[key]: row for row in self.rows}
        if len(self.done) != len(self.rows):
            raise ValueError(f"{path} holds repeated {key}s")

    def _damaged(self, file: Path, err: Exception) -> ValueError:
        """The error for a log or state file that cannot be read: which, and how to go on."""
        return ValueError(f"{file} is damaged ({err}), so the run cannot be resumed; delete "
                          f"{self.path} and {self.state_path} to start over")

    def _read_state(self) -> dict:
        """``<name>.resume.json``, checked for the fields a resume needs."""
        try:
            state = json.loads(self.state_path.read_text())
        except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
            raise self._damaged(self.state_path, err) from None
        missing = [k for k in ("settings", "answered", "seconds", "rng")
                   if not isinstance(state, dict) or k not in state]
        if missing:
            raise self._damaged(self.state_path, f"it lacks {missing}")
        return state

    def _check(self, old: dict) -> None:
        changed = sorted(k for k in old.keys() | self.settings.keys()
                         if old.get(k) != self.settings.get(k))
        if changed:
            was = {k: old.get(k) for k in changed}
            now = {k: self.settings.get(k) for k in changed}
            raise ValueError(f"refusing to resume {self.path}: it was written with other "
                             f"settings ({was}, now {now}); use another output folder, or "
                             "delete it and its .resume.json to start over")

    def _check_code(self, old: dict | None) -> None:
        now = code_version()
        if old == now:
            return
        changed = ("not recorded (written before code was recorded)" if old is None else
                   ", ".join(f"{k} {old.get(k)} -> {now.get(k)}" for k in sorted(old.keys()
                             | now.keys()) if old.get(k) != now.get(k)))
        raise ValueError(f"refusing to resume {self.path}: it was answered by other code "
                         f"({changed}), and its answers would mix with this code's; use another "
                         "output folder, or delete it and its .resume.json to start over")

    def _read(self, answered: int) -> list[dict]:
        """The first ``answered`` lines; later ones (a torn line, a batch whose state was not
        saved) are cut from the file, so new lines follow the last counted one."""
        data = self.path.read_bytes() if self.path.is_file() else b""
        lines = data.split(b"\n")[:-1]  # what follows the last newline is torn
        if len(lines) < answered:
            raise ValueError(f"{self.path} has {len(lines)} lines but {self.state_path.name} "
                             f"counts {answered}; it cannot be resumed exactly")
        keep = lines[:answered]
        size = sum(len(line) + 1 for line in keep)
        if size != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(size)
        try:
            return [json.loads(line) for line in keep]
        except ValueError as err:
            raise self._damaged(self.path, err) from None

    def _save_state(self) -> None:
        atomic_write(self.state_path, json.dumps(
            {"settings": self.settings, "code": code_version(), "answered": len(self.rows),
             "seconds": self.seconds, "rng": rng_state()}))

    def append(self, rows: list[dict], seconds: float) -> None:
        """Log one batch: its lines reach the disk before the state that counts them."""
        self.rows += rows
        self.seconds += seconds
        self.done.update((row[self.key], row) for row in rows)
        if self.path is None:
            return
        with open(self.path, "ab") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows).encode())
            f.flush()
            os.fsync(f.fileno())
        self._save_state()

    def answer(self, ids: list[Hashable], batch_size: int,
               generate: Callable[[list[int]], list[dict]], desc: str) -> list[dict]:
        """The row of each id, in order: logged ones read back, the others made by ``generate``
        (indices into ``ids`` -> their rows), ``batch_size`` at a time and logged per batch."""
        done = self.done
        todo = [i for i, k in enumerate(ids) if k not in done]
        if self.path is not None and len(todo) < len(ids):
            resuming = (f"resuming {self.path}: {len(ids) - len(todo)} of {len(ids)} already "
                        f"answered, answering {len(todo)}")
            print(resuming, file=sys.stderr, flush=True)
            log.info("%s: %s", desc, resuming)
        else:
            log.info("%s: answering %d", desc, len(todo))
        made: dict[int, dict] = {}
        progress = Progress(desc, len(todo))
        with tqdm(total=len(ids), initial=len(ids) - len(todo), desc=desc, leave=False,
                  dynamic_ncols=True, disable=None) as bar:
            for batch in batches(todo, batch_size):
                if self._rng is not None:  # where the interrupted run stood before this batch
                    set_rng_state(self._rng)
                    self._rng = None
                began = time.perf_counter()
                rows = generate(batch)
                self.append(rows, time.perf_counter() - began)
                made.update(zip(batch, rows))
                bar.update(len(batch))
                progress.update(len(batch))
        progress.finished()
        return [made[i] if i in made else done[k] for i, k in enumerate(ids)]

    @property
    def tokens(self) -> int:
        """Generated tokens over every logged row (rows carry ``n_tokens``)."""
        return sum(row["n_tokens"] for row in self.rows)
