"""What a run folder keeps for a resume: the log window a checkpoint carries (``LogWindow``),
the newest and previous checkpoints (``CheckpointFiles``), the config and data a checkpoint is
valid for, the random states, the log trimmed back, the finished aligner and the folder's lock."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch
from filelock import FileLock, Timeout

from sae_training import checkpoint
from sae_training.checkpoint import (
    CheckpointFiles,
    LogWindow,
    check_resumable,
    config_changes,
    config_identity,
    load_aligner,
    restore_rng,
    rng_state,
    save_aligner,
)
from sae_training.config import TrainConfig
from vlsae_hooks.spaces import AuxAligner
from vlsae_hooks.tensor_files import save_tensors


def test_a_window_averages_its_steps_and_starts_anew():
    window = LogWindow()
    window.add({"loss": 1.0, "mse": torch.tensor(0.5)})
    window.add({"loss": 2.0, "mse": torch.tensor(1.5)})
    assert window.count == 2
    assert window.close() == {"loss": 1.5, "mse": 1.0}
    assert (window.sums, window.count) == ({}, 0)
    window.add({"loss": 4.0})
    assert window.close() == {"loss": 4.0}


def test_a_window_goes_through_a_checkpoint_as_it_was():
    """Saved midway and restored, the window closes to the same means as one never saved
    (tensors on the CPU in the checkpoint, back on the device after)."""
    window = LogWindow()
    window.add({"loss": 3.0, "mse": torch.tensor(2.0)})
    state = window.state()
    assert state["count"] == 1 and state["sums"]["mse"].device.type == "cpu"
    restored = LogWindow.from_state(state, torch.device("cpu"))
    for going_on in (window, restored):
        going_on.add({"loss": 1.0, "mse": torch.tensor(4.0)})
    assert restored.close() == window.close() == {"loss": 2.0, "mse": 3.0}


def test_a_checkpoint_without_a_window_starts_an_empty_one():
    assert LogWindow.from_state(None) == LogWindow()


class Payload:
    """An object a checkpoint of plain tensors and numbers never holds."""


def test_the_previous_checkpoint_is_kept_and_a_torn_newest_is_not(tmp_path: Path,
                                                                  monkeypatch, caplog) -> None:
    synced = []
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: synced.append(fd))
    files = CheckpointFiles(tmp_path)
    assert files.read() is None
    for step in (4, 8):
        files.write({"step": step})
    assert synced and len(synced) == 2  # each written in full before it replaces the newest
    assert torch.load(tmp_path / "checkpoint.prev.pt", weights_only=True) == {"step": 4}
    (tmp_path / "checkpoint.pt").write_bytes(b"torn")
    files = CheckpointFiles(tmp_path)  # a resumed run
    with caplog.at_level(logging.WARNING, "sae_training"):
        assert files.read() == {"step": 4}
    assert "resuming from the previous checkpoint" in caplog.text
    files.write({"step": 12})  # over the torn one: the good previous stays
    assert torch.load(tmp_path / "checkpoint.prev.pt", weights_only=True) == {"step": 4}
    files.write({"step": 16})  # the one before is kept again
    assert torch.load(tmp_path / "checkpoint.prev.pt", weights_only=True) == {"step": 12}
    assert files.read() == {"step": 16}


def test_a_lone_previous_checkpoint_resumes_with_a_warning(tmp_path: Path, caplog) -> None:
    torch.save({"step": 4}, tmp_path / "checkpoint.prev.pt")  # killed between the two renames
    with caplog.at_level(logging.WARNING, "sae_training"):
        assert CheckpointFiles(tmp_path).read() == {"step": 4}
    assert "resuming from the previous checkpoint" in caplog.text


def test_a_checkpoint_holding_arbitrary_objects_is_not_unpickled(tmp_path: Path) -> None:
    torch.save({"step": 4, "payload": Payload()}, tmp_path / "checkpoint.pt")
    with pytest.raises(RuntimeError, match="no readable checkpoint"):
        CheckpointFiles(tmp_path).read()


def test_settings_that_do_not_change_the_result_and_the_run_folder_are_no_change(
        tmp_path: Path) -> None:
    """A run moved to another folder, or resumed with other logging, checkpoint or resume
    switches, is the same run; every other field counts, also one only one side has."""
    saved = TrainConfig(data=str(tmp_path), out=str(tmp_path / "run")).to_dict()
    moved = {**saved, "out": str(tmp_path / "moved"), "resume": not saved["resume"],
             "checkpoint_every": saved["checkpoint_every"] + 1,
             "log_every": saved["log_every"] + 1}
    assert config_changes(saved, moved) == []
    changed = {**moved, "seed": saved["seed"] + 1, "max_samples": 7, "mixed_precision": "bf16",
               "val_fraction": 0.5, "max_val_samples": 3, "use_aligner": False}
    assert config_changes(saved, changed) == ["max_samples", "max_val_samples", "mixed_precision",
                                              "seed", "use_aligner", "val_fraction"]  # sorted
    assert config_changes({**saved, "gone": 1}, {**saved, "new": 2}) == ["gone", "new"]


def test_places_are_compared_as_places(tmp_path: Path, monkeypatch) -> None:
    """A local model folder nested in the config is compared as its absolute path; a data path
    is a place even before it exists (relative to where the run was started); a hub dataset is
    a name wherever the run starts."""
    (tmp_path / "a" / "text_model").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    saved = config_identity({"data": "pairs/*.tar", "model": {"text_model": "text_model/"}})
    assert saved == {"data": str(tmp_path / "a" / "pairs" / "*.tar"),
                     "model": {"text_model": str(tmp_path / "a" / "text_model")}}
    hub = config_identity({"data": "hf:org/pairs"})
    monkeypatch.chdir(tmp_path / "b")
    assert config_changes(saved, {"data": "../a/pairs/*.tar",
                                  "model": {"text_model": "../a/text_model"}}) == []
    assert config_changes(saved, {"data": "pairs/*.tar",
                                  "model": {"text_model": "../a/text_model"}}) == ["data"]
    assert config_changes(hub, {"data": "hf:org/pairs"}) == []


def test_a_checkpoint_without_a_data_fingerprint_resumes_on_any_data(tmp_path: Path) -> None:
    config = TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"))
    state = {"config": config_identity(config.to_dict())}  # written before fingerprints were
    check_resumable(state, config, {"pairs": 8, "files": []}, tmp_path / "run")
    with pytest.raises(ValueError, match="changed since the checkpoint"):
        check_resumable({**state, "data": {"pairs": 9, "files": []}}, config,
                        {"pairs": 8, "files": []}, tmp_path / "run")


def test_the_random_states_come_back() -> None:
    state = rng_state()
    drawn = (random.random(), torch.rand(3))
    restore_rng(state)
    again = (random.random(), torch.rand(3))
    assert drawn[0] == again[0] and torch.equal(drawn[1], again[1])


def test_the_log_is_trimmed_back_to_the_checkpoints_stage_and_step(tmp_path: Path,
                                                                    caplog) -> None:
    path = tmp_path / "train_log.jsonl"
    checkpoint.trim_log(path, "sae", 4)  # no log yet: nothing to trim
    assert not path.exists()
    lines = [f'{{"stage": "{stage}", "step": {step}}}' for stage in ("aligner", "sae")
             for step in (2, 4, 6)]
    path.write_text("\n".join(lines) + '\n{"stage": "sae", "st')  # torn by the kill
    with caplog.at_level(logging.WARNING, "sae_training"):
        checkpoint.trim_log(path, "sae", 4)
    assert path.read_text() == "\n".join(lines[:5]) + "\n"
    assert "dropping the torn last line" in caplog.text
    checkpoint.trim_log(path, "aligner", 4)  # the aligner restarts from its step 4
    assert path.read_text() == "\n".join(lines[:2]) + "\n"


def test_a_log_line_torn_before_the_last_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "train_log.jsonl"
    path.write_text('{"stage": "sae", "step": 2}\n{"stage": "sae", "st\n'
                    '{"stage": "sae", "step": 4}\n')
    with pytest.raises(ValueError, match=rf"{path} line 2 is not JSON"):
        checkpoint.trim_log(path, "sae", 4)


def test_the_aligner_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    first, path = AuxAligner(4), tmp_path / "aligner.safetensors"
    save_aligner(first, path)

    def torn(tensors, file, **kwargs):
        Path(file).write_bytes(b"torn")
        raise OSError("no space left on device")

    monkeypatch.setattr("vlsae_hooks.tensor_files.save_file", torn)
    with pytest.raises(OSError, match="no space left"):
        save_aligner(AuxAligner(4), path)
    loaded = AuxAligner(4)
    load_aligner(loaded, path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                  first.state_dict().values(), strict=True))


def test_an_aligner_file_missing_weights_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "aligner.safetensors"
    save_aligner(AuxAligner(4), path)
    weights = checkpoint.load_file(str(path))
    del weights["text_decoder.bias"]
    save_tensors(weights, path)
    with pytest.raises(RuntimeError, match=rf"(?s){path} is unreadable .*text_decoder\.bias"):
        load_aligner(AuxAligner(4), path)


def _held(folder: Path) -> bool:
    """Whether another trainer holds ``folder``'s lock."""
    lock = FileLock(folder / ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


def test_only_the_main_process_takes_the_lock_and_it_is_let_go(tmp_path: Path) -> None:
    for main_process in (False, True):
        with checkpoint.locked_run_folder(tmp_path, main_process):
            assert _held(tmp_path) == main_process
        assert not _held(tmp_path)
    with pytest.raises(ZeroDivisionError), checkpoint.locked_run_folder(tmp_path, True):
        raise ZeroDivisionError
    assert not _held(tmp_path)
    assert issubclass(checkpoint.RunFolderInUse, OSError)  # the commands' refused input
