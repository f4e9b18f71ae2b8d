"""Evaluation runs write answers as they come and resume after a kill: a real SIGKILL of the
POPE command, an interrupted toy-world evaluation, a batched run under another limit, and the
4-bit / device-map options reaching ``from_pretrained`` (the answer log itself:
``reproduce/test_journal.py``)."""

import contextlib
import json
import os
import re
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
from eval_suites.reproduce.journal import STATE_SUFFIX
from eval_suites.toyworld.evaluate import EvalSettings, evaluate
from sae_training.hub_kernels import offline_kernels

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

    # one log for both runs: the killed one's start, then the resumed one's start and end
    log = (out / "pope.log").read_text()
    lines = [line.split(" ", 3)[3] for line in log.splitlines()]
    assert [line.split(" ", 1)[0] for line in lines].count("settings") == 2
    assert lines[1] == "POPE vcd_random: answering 8"
    assert lines.index(f"POPE vcd_random: {match[0]}") > 1
    assert re.fullmatch(rf"POPE vcd_random: {8 - kept} answered in \d+ s", lines[-2])
    assert lines[-1] == (f"results {json.dumps(report['results'])}; wrote {out / 'pope.json'} "
                         f"and {out / 'pope.md'}")

    with pytest.raises(SystemExit):  # the same folder with another seed is refused
        reproduce([*args, "--out", str(out), "--seed", "7"])
    assert (out / "pope.log").read_text() == log  # refused before it began: nothing logged


class _Flaky(HFDecoder):
    """Greedy that fails after ``fail_after`` batches, counting the batches it answers (an
    ``HFDecoder``, so that a sampled evaluation can switch it to sampling)."""

    fail_after: int | None = None
    calls = 0

    def __init__(self, model, processor):
        super().__init__(model, processor, do_sample=False)

    def generate(self, images, prompts, max_new_tokens):
        if _Flaky.fail_after is not None and _Flaky.calls >= _Flaky.fail_after:
            raise KeyboardInterrupt
        _Flaky.calls += 1
        return super().generate(images, prompts, max_new_tokens)


@contextlib.contextmanager
def _flaky(model, processor):
    yield _Flaky(model, processor)


@pytest.mark.parametrize("decoding", ["greedy", "sample"])
def test_interrupted_toy_evaluation_resumes(toy_llava, tmp_path, decoding):
    """Resumed, a run answers as if never stopped, sampled too (each batch seeded from its
    first answer's id)."""
    torch.set_num_threads(1)
    register_method("flaky-greedy", _flaky)
    try:
        model, processor = toy_llava
        settings = EvalSettings(seed=3, n_images=2, batch_size=4, caption_tokens=8,
                                decoding=decoding)
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
        assert resumed["examples"] == whole["examples"]
        with pytest.raises(ValueError, match="other settings"):
            evaluate("flaky-greedy", EvalSettings(seed=4, n_images=2), model, processor, answers)
    finally:
        METHODS.pop("flaky-greedy", None)


def test_4bit_and_device_map_options(protocol_data, protocol_model_dir, tmp_path, monkeypatch):
    """A model placed by ``from_pretrained`` (quantized, or by a device map) is not moved
    afterwards; a plain one is moved to the run's device."""
    seen: list[dict] = []
    moved: list[list[tuple]] = []
    real = runner.AutoModelForImageTextToText

    class Recording:
        @staticmethod
        def from_pretrained(path, **kwargs):
            seen.append(kwargs)
            model, moves = real.from_pretrained(path, dtype=kwargs["dtype"]), []
            moved.append(moves)
            model.to = lambda *args, _to=model.to: moves.append(args) or _to(*args)
            return model

    monkeypatch.setattr(runner, "AutoModelForImageTextToText", Recording)
    base = ["pope", "--model", str(protocol_model_dir), "--method", "regular", "--questions",
            str(protocol_data / "pope" / "vcd_random.jsonl"),
            "--images", str(protocol_data / "images"), *QUICK, "--limit", "1"]
    reproduce([*base, "--out", str(tmp_path / "a"), "--load-in-4bit", "--dtype", "bfloat16"])
    reproduce([*base, "--out", str(tmp_path / "b"), "--device-map", "auto"])
    reproduce([*base, "--out", str(tmp_path / "c")])
    quantized, mapped, plain = seen
    assert quantized["quantization_config"].load_in_4bit is True
    assert quantized["dtype"] == quantized["quantization_config"].bnb_4bit_compute_dtype == (
        torch.bfloat16)
    assert moved == [[], [], [("cpu",)]]
    assert quantized["device_map"] == {"": "cpu"}
    assert mapped["device_map"] == "auto" and "quantization_config" not in mapped
    assert plain == offline_kernels({"dtype": plain["dtype"]})  # and use_kernels=False offline
    report = json.loads((tmp_path / "a" / "pope.json").read_text())
    assert report["settings"]["load_in_4bit"] is True


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
