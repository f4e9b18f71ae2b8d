"""The answer log (``eval_suites.reproduce.journal``): answers written as they come, a torn
last line dropped, answered ids skipped, the generators restored, and a resume under other
settings, other code or a damaged file refused with what to do; and the lines it gives a
run's log file (``eval_suites.run_log``) on how far it has got."""

import json
import logging
import random
import re

import numpy as np
import pytest
import torch

from eval_suites.reproduce import journal
from eval_suites.reproduce.journal import STATE_SUFFIX, AnswerLog, batches, duration


def _lines(path):
    return path.read_text().splitlines()


def test_answer_log_drops_a_torn_line_and_skips_answered_ids(tmp_path):
    path = tmp_path / "a.answers.jsonl"
    asked: list[int] = []

    def make(batch: list[int]) -> list[dict]:
        asked.extend(batch)
        return [{"id": f"q{i}", "text": f"answer {i}", "n_tokens": i} for i in batch]

    ids = [f"q{i}" for i in range(5)]
    log = AnswerLog(path, {"method": "m", "seed": 1})
    log.answer(ids[:3], 2, make, "test")
    with open(path, "a") as f:
        f.write('{"id": "q3", "te')  # killed mid-line
    asked.clear()
    log = AnswerLog(path, {"method": "m", "seed": 1})
    assert [r["id"] for r in log.rows] == ids[:3] and not path.read_text().endswith("te")
    rows = log.answer(ids, 2, make, "test")
    assert asked == [3, 4] and [r["id"] for r in rows] == ids and log.tokens == 10
    assert [json.loads(line)["id"] for line in _lines(path)] == ids
    assert json.loads(path.with_suffix(".resume.json").read_text())["answered"] == 5

    with open(path, "a") as f:  # a batch whose state was never saved is dropped too
        f.write(json.dumps({"id": "q9", "text": "", "n_tokens": 0}) + "\n")
    assert [r["id"] for r in AnswerLog(path, {"method": "m", "seed": 1}).rows] == ids
    assert len(_lines(path)) == 5

    with pytest.raises(ValueError, match=r"other settings \(\{'seed': 1\}, now \{'seed': 2\}"):
        AnswerLog(path, {"method": "m", "seed": 2})
    path.with_suffix(".resume.json").unlink()
    with pytest.raises(ValueError, match="exists without a.answers.resume.json"):
        AnswerLog(path, {"method": "m", "seed": 1})


def test_answers_of_other_code_are_not_resumed(tmp_path, monkeypatch):
    path = tmp_path / "a.answers.jsonl"
    log = AnswerLog(path, {"method": "m"})
    log.append([{"id": "q0", "n_tokens": 1}], 0.1)
    state = json.loads(path.with_suffix(STATE_SUFFIX).read_text())
    assert state["code"] == journal.code_version()
    assert set(state["code"]) == {"vlsae_hooks", "sae_training", "eval_suites", "torch",
                                  "transformers"}
    assert [r["id"] for r in AnswerLog(path, {"method": "m"}).rows] == ["q0"]  # same code

    edited = state["code"] | {"vlsae_hooks": "0" * 16}
    monkeypatch.setattr(journal, "code_version", lambda: edited)
    with pytest.raises(ValueError, match=rf"other code \(vlsae_hooks {state['code']['vlsae_hooks']}"
                                         r" -> 0{16}\), and its answers would mix"):
        AnswerLog(path, {"method": "m"})
    monkeypatch.undo()
    del state["code"]  # a state written before the code was recorded
    path.with_suffix(STATE_SUFFIX).write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"other code \(not recorded"):
        AnswerLog(path, {"method": "m"})


def test_code_version_follows_the_source(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(journal, "CODE_PACKAGES", ("pkg",))
    first = journal.code_version.__wrapped__()
    (package / "a.py").write_text("x = 2\n")
    second = journal.code_version.__wrapped__()
    (package / "notes.txt").write_text("not code")
    assert first["pkg"] != second["pkg"] == journal.code_version.__wrapped__()["pkg"]
    assert set(first) == {"pkg", "torch", "transformers"}
    assert torch.__version__.startswith(first["torch"])  # the wheel's version, without +cu130


def test_a_run_that_failed_before_answering_takes_the_corrected_settings(tmp_path):
    path = tmp_path / "a.answers.jsonl"
    AnswerLog(path, {"method": "m", "batch_size": 0})  # then failed before its first batch
    log = AnswerLog(path, {"method": "m", "batch_size": 8})
    assert log.rows == []
    state = json.loads(path.with_suffix(".resume.json").read_text())
    assert state["settings"] == {"method": "m", "batch_size": 8} and state["answered"] == 0


def test_answer_log_restores_the_generators_before_the_first_new_batch(tmp_path):
    path = tmp_path / "s.jsonl"

    def draw(batch: list[int]) -> list[dict]:
        return [{"id": i, "x": torch.rand(1).item(), "n_tokens": 1} for i in batch]

    torch.manual_seed(0)
    whole = AnswerLog(None).answer(list(range(4)), 1, draw, "test")
    torch.manual_seed(0)
    AnswerLog(path).answer([0, 1], 1, draw, "test")
    torch.manual_seed(123)  # a fresh process would start elsewhere
    assert AnswerLog(path).answer(list(range(4)), 1, draw, "test") == whole


def test_a_last_batch_of_one_joins_the_batch_before():
    assert batches(list(range(5)), 2) == [[0, 1], [2, 3, 4]]
    assert batches(list(range(6)), 2) == [[0, 1], [2, 3], [4, 5]]
    assert batches([7], 32) == [[7]]
    assert batches(list(range(33)), 32) == [list(range(33))]
    assert batches([], 4) == []
    # batches of one (the reference's protocols) stay one row each, the last two too
    assert batches(list(range(3)), 1) == [[0], [1], [2]]


def test_a_damaged_log_names_its_file_and_how_to_start_over(tmp_path):
    path = tmp_path / "pope.answers.jsonl"
    state = path.with_suffix(STATE_SUFFIX)
    AnswerLog(path, {"seed": 1}).answer(["q0"], 1, lambda batch: [
        {"id": "q0", "n_tokens": 1}], "test")
    start_over = f"so the run cannot be resumed; delete {path} and {state} to start over"
    whole = state.read_text()
    state.write_text(whole[:20])  # a truncated state file
    with pytest.raises(ValueError) as error:
        AnswerLog(path, {"seed": 1})
    assert str(error.value) == (f"{state} is damaged (Expecting ':' delimiter: line 1 "
                                f"column 21 (char 20)), {start_over}")
    state.write_text(json.dumps({"answered": 1}))
    with pytest.raises(ValueError) as error:
        AnswerLog(path, {"seed": 1})
    assert str(error.value) == (f"{state} is damaged (it lacks ['settings', 'seconds', 'rng']), "
                                f"{start_over}")
    state.write_text(whole)
    path.write_text('{"id": "q0", \n')  # a damaged counted line
    with pytest.raises(ValueError) as error:
        AnswerLog(path, {"seed": 1})
    assert str(error.value) == (f"{path} is damaged (Expecting property name enclosed in double "
                                f"quotes: line 1 column 14 (char 13)), {start_over}")


def test_restore_covers_the_python_and_numpy_generators(tmp_path):
    def draw(batch: list[int]) -> list[dict]:
        return [{"id": i, "x": [torch.rand(1).item(), random.random(), float(np.random.rand())],
                 "n_tokens": 1} for i in batch]

    def seed(value: int) -> None:
        torch.manual_seed(value)
        random.seed(value)
        np.random.seed(value)

    seed(0)
    whole = AnswerLog(None).answer(list(range(4)), 1, draw, "test")
    seed(0)
    AnswerLog(tmp_path / "s.jsonl").answer([0, 1], 1, draw, "test")
    seed(123)  # a fresh process would start elsewhere
    assert AnswerLog(tmp_path / "s.jsonl").answer(list(range(4)), 1, draw, "test") == whole


def test_a_resumed_log_keeps_its_generation_seconds(tmp_path):
    AnswerLog(tmp_path / "a.jsonl", {"m": 1}).append([{"id": "q0", "n_tokens": 1}], 2.5)
    resumed = AnswerLog(tmp_path / "a.jsonl", {"m": 1})
    resumed.append([{"id": "q1", "n_tokens": 1}], 1.0)
    assert resumed.seconds == 3.5  # what the report's time per token divides


def test_lines_reach_the_file_before_the_state_counts_them(tmp_path, monkeypatch):
    path = tmp_path / "a.jsonl"
    log = AnswerLog(path, {"m": 1})
    real = journal.atomic_write
    counted = []

    def checked(state_path, data):
        counted.append(json.loads(data)["answered"])
        assert len(_lines(path)) >= counted[-1]  # a kill now keeps a consistent pair
        real(state_path, data)

    monkeypatch.setattr(journal, "atomic_write", checked)
    log.append([{"id": "q0", "n_tokens": 1}, {"id": "q1", "n_tokens": 1}], 0.1)
    assert counted == [2]


def answer(answers: AnswerLog, n: int) -> list[dict]:
    """``answers`` holding the answers to questions q0 ... q{n-1}, two a batch."""
    ids = [f"q{i}" for i in range(n)]
    return answers.answer(ids, 2, lambda batch: [{"id": ids[i], "n_tokens": 1} for i in batch],
                          "POPE x")


def test_a_log_shorter_than_its_state_counts_or_with_a_repeated_id_is_refused(tmp_path):
    path = tmp_path / "pope.answers.jsonl"
    log = AnswerLog(path, {"seed": 1})
    answer(log, 2)
    whole = path.read_text()
    path.write_text(whole.splitlines(keepends=True)[0])  # a line lost after its state was saved
    with pytest.raises(ValueError, match=rf"^{path} has 1 lines but pope.answers.resume.json "
                                         "counts 2; it cannot be resumed exactly$"):
        AnswerLog(path, {"seed": 1})
    path.write_text(whole.replace('"q1"', '"q0"'))
    with pytest.raises(ValueError, match=rf"^{path} holds repeated ids$"):
        AnswerLog(path, {"seed": 1})


def test_an_answering_run_logs_its_start_and_end_and_a_resume(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="eval_suites")
    answer(AnswerLog(tmp_path / "x.answers.jsonl"), 6)
    answer(AnswerLog(tmp_path / "x.answers.jsonl"), 8)  # two more questions
    assert caplog.messages == [
        "POPE x: answering 6", "POPE x: 6 answered in 0 s",
        f"POPE x: resuming {tmp_path / 'x.answers.jsonl'}: 6 of 8 already answered, "
        "answering 2", "POPE x: 2 answered in 0 s"]


def test_progress_lines_say_how_far_and_how_long_is_left(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(journal, "PROGRESS_EVERY_S", 0.0)  # a line after every batch
    caplog.set_level(logging.INFO, logger="eval_suites")
    answer(AnswerLog(None), 6)
    assert len(caplog.messages) == 4  # none after the last batch: the end's line says it
    for line, count in zip(caplog.messages[1:3], (2, 4)):
        assert re.fullmatch(rf"POPE x: {count} of 6 answered, \d+\.\d\d s each, about \d+ s "
                            "left", line), line


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (42.4, "42 s"), (420, "7 min"),
                                           (12_600, "3.5 h")])
def test_durations_read_as_a_person_reads_them(seconds, text):
    assert duration(seconds) == text
