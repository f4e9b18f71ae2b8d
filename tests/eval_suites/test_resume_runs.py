"""Evaluation runs write answers as they come and resume after a kill: a real SIGKILL of the
POPE command, an interrupted toy-world evaluation, the answer log's torn-line and settings
checks, and the 4-bit / device-map options reaching ``from_pretrained``."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.protocol import QUICK

from eval_suites.core.decoder import HFDecoder
from eval_suites.core.methods import METHODS, register_method
from eval_suites.reproduce import runner
from eval_suites.reproduce.__main__ import main as reproduce
from eval_suites.reproduce.journal import STATE_SUFFIX, AnswerLog
from eval_suites.toyworld.evaluate import EvalSettings, evaluate

ROOT = Path(__file__).resolve().parents[2]
WRAPPER = """
import os, runpy, sys, time
from eval_suites.core import decoder
generate = decoder.HFDecoder.generate
def counted(self, images, prompts, max_new_tokens):
    print(f"generating {len(images)} items", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("SLOW_BATCH_S", "0")))
    return generate(self, images, prompts, max_new_tokens)
decoder.HFDecoder.generate = counted
sys.argv[0] = "eval_suites.reproduce"
runpy.run_module("eval_suites.reproduce", run_name="__main__")
"""


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def _counted(answers: Path) -> int:
    """How many answers the log's state counts (what a resumed run keeps)."""
    state = answers.with_suffix(STATE_SUFFIX)
    return json.loads(state.read_text())["answered"] if state.is_file() else 0


def test_killed_pope_run_resumes_exactly(protocol_data, protocol_model_dir, tmp_path):
    """Sampled decoding, batches of 2: the resumed run restores the random generators, so its
    answers and scores equal an uninterrupted run's, and it answers only what was missing."""
    torch.set_num_threads(1)
    args = ["pope", "--model", str(protocol_model_dir), "--method", "regular", "--questions",
            str(protocol_data / "pope" / "vcd_random.jsonl"),
            "--images", str(protocol_data / "images"),
            *QUICK, "--limit", "8", "--batch-size", "2", "--max-new-tokens", "6"]
    reproduce([*args, "--out", str(tmp_path / "whole")])
    whole = tmp_path / "whole" / "pope_vcd_random.answers.jsonl"

    wrapper = tmp_path / "run.py"
    wrapper.write_text(WRAPPER)
    out = tmp_path / "killed"
    answers = out / "pope_vcd_random.answers.jsonl"
    command = [sys.executable, str(wrapper), *args, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=ROOT, env={**env, "SLOW_BATCH_S": "1.5"},
                                 stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 240
            # killed once a batch is counted: lines written but not yet counted (a kill in
            # between) are cut on resume, which would leave nothing to resume from
            while (_counted(answers) < 2 and first.poll() is None
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            first.send_signal(signal.SIGKILL)
        finally:
            with contextlib.suppress(ProcessLookupError):
                first.kill()
            first.wait()
    before = _lines(answers)
    assert 2 <= len(before) < 8, (tmp_path / "first.log").read_text()[-2000:]
    assert not (out / "pope.json").exists()

    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=240, check=False)
    assert second.returncode == 0, second.stderr[-2000:]
    after = _lines(answers)
    assert after == _lines(whole)  # same sampled answers as the uninterrupted run
    match = [line for line in second.stderr.splitlines() if line.startswith("resuming ")]
    assert len(match) == 1 and " of 8 already answered" in match[0]
    kept = int(match[0].split(": ")[1].split(" of ")[0])
    assert after[:kept] == before[:kept] and kept >= len(before) - 2
    generated = [int(line.split()[1]) for line in second.stderr.splitlines()
                 if line.startswith("generating ")]
    assert sum(generated) == 8 - kept  # the answered questions were not asked again
    report = json.loads((out / "pope.json").read_text())
    expected = json.loads((tmp_path / "whole" / "pope.json").read_text())
    assert report["results"] == expected["results"]
    assert report["generated_tokens"] == expected["generated_tokens"]

    with pytest.raises(SystemExit):  # the same folder with another seed is refused
        reproduce([*args, "--out", str(out), "--seed", "7"])


class _Flaky:
    """Greedy that fails after ``fail_after`` batches, counting the batches it answers."""

    fail_after: int | None = None
    calls = 0

    def __init__(self, model, processor):
        self.inner = HFDecoder(model, processor, do_sample=False)

    def generate(self, images, prompts, max_new_tokens):
        if _Flaky.fail_after is not None and _Flaky.calls >= _Flaky.fail_after:
            raise KeyboardInterrupt
        _Flaky.calls += 1
        return self.inner.generate(images, prompts, max_new_tokens)


@contextlib.contextmanager
def _flaky(model, processor):
    yield _Flaky(model, processor)


def test_interrupted_toy_evaluation_resumes(toy_llava, tmp_path):
    torch.set_num_threads(1)
    register_method("flaky-greedy", _flaky)
    try:
        model, processor = toy_llava
        settings = EvalSettings(seed=3, n_images=2, batch_size=4, caption_tokens=8)
        _Flaky.fail_after, _Flaky.calls = None, 0
        whole = evaluate("flaky-greedy", settings, model, processor)
        total = _Flaky.calls
        answers = tmp_path / "flaky.answers.jsonl"
        _Flaky.fail_after, _Flaky.calls = 2, 0
        with pytest.raises(KeyboardInterrupt):
            evaluate("flaky-greedy", settings, model, processor, answers)
        assert len(_lines(answers)) == 8  # two batches of 4
        _Flaky.fail_after, _Flaky.calls = None, 0
        resumed = evaluate("flaky-greedy", settings, model, processor, answers)
        assert _Flaky.calls == total - 2
        assert resumed["pope"] == whole["pope"] and resumed["chair"] == whole["chair"]
        assert resumed["generated_tokens"] == whole["generated_tokens"]
        with pytest.raises(ValueError, match="other settings"):
            evaluate("flaky-greedy", EvalSettings(seed=4, n_images=2), model, processor, answers)
    finally:
        METHODS.pop("flaky-greedy", None)


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
    from eval_suites.reproduce import journal

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
    from eval_suites.reproduce import journal

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


def test_4bit_and_device_map_options(protocol_data, protocol_model_dir, tmp_path, monkeypatch):
    seen: list[dict] = []
    real = runner.AutoModelForImageTextToText

    class Recording:
        @staticmethod
        def from_pretrained(path, **kwargs):
            seen.append(kwargs)
            return real.from_pretrained(path, dtype=kwargs["dtype"])

    monkeypatch.setattr(runner, "AutoModelForImageTextToText", Recording)
    base = ["pope", "--model", str(protocol_model_dir), "--method", "regular", "--questions",
            str(protocol_data / "pope" / "vcd_random.jsonl"),
            "--images", str(protocol_data / "images"), *QUICK, "--limit", "1"]
    reproduce([*base, "--out", str(tmp_path / "a"), "--load-in-4bit"])
    reproduce([*base, "--out", str(tmp_path / "b"), "--device-map", "auto"])
    reproduce([*base, "--out", str(tmp_path / "c")])
    quantized, mapped, plain = seen
    assert quantized["quantization_config"].load_in_4bit is True
    assert quantized["device_map"] == {"": "cpu"}
    assert mapped["device_map"] == "auto" and "quantization_config" not in mapped
    assert set(plain) == {"dtype"}
    report = json.loads((tmp_path / "a" / "pope.json").read_text())
    assert report["settings"]["load_in_4bit"] is True


def test_a_last_batch_of_one_joins_the_batch_before():
    from eval_suites.reproduce.journal import batches

    assert batches(list(range(5)), 2) == [[0, 1], [2, 3, 4]]
    assert batches(list(range(6)), 2) == [[0, 1], [2, 3], [4, 5]]
    assert batches([7], 32) == [[7]]
    assert batches(list(range(33)), 32) == [list(range(33))]
    assert batches([], 4) == []
    # batches of one (the reference's protocols) stay one row each, the last two too
    assert batches(list(range(3)), 1) == [[0], [1], [2]]


def test_a_batched_run_is_not_resumed_under_another_limit(protocol_data, protocol_model_dir,
                                                         tmp_path, capsys):
    """One at a time, a run limited to its first items goes on under a larger limit; batched,
    the items after the limit would be batched as no uninterrupted run batches them."""
    torch.set_num_threads(1)
    base = ["pope", "--model", str(protocol_model_dir), "--method", "greedy", "--questions",
            str(protocol_data / "pope" / "vcd_random.jsonl"),
            "--images", str(protocol_data / "images"), *QUICK, "--max-new-tokens", "2"]
    reproduce([*base, "--out", str(tmp_path / "one"), "--limit", "1"])
    reproduce([*base, "--out", str(tmp_path / "one"), "--limit", "2"])
    assert "resuming " in capsys.readouterr().err
    reproduce([*base, "--out", str(tmp_path / "two"), "--limit", "3", "--batch-size", "2"])
    with pytest.raises(SystemExit):
        reproduce([*base, "--out", str(tmp_path / "two"), "--limit", "4", "--batch-size", "2"])
    assert "refusing to resume" in capsys.readouterr().err


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
