"""What the POPE and CHAIR protocols share (``eval_suites.reproduce.runner``): the model a run
loads (a non-VLM refused), the environment and settings block a report records, and a run's
answering, with the decoder's answers scripted and the clock counted so every number is exact."""

import itertools
import json
from types import SimpleNamespace

import pytest
from helpers.jsonl import read_jsonl
from PIL import Image

from eval_suites.core import decoder
from eval_suites.reproduce import journal, runner
from eval_suites.reproduce.__main__ import main as reproduce
from eval_suites.reproduce.runner import environment, settings_markdown, write_report
from eval_suites.reproduce.settings import RunSettings
from sae_training import store

BASE = dict(model="m", max_new_tokens=4, alpha=None)


def test_environment_names_a_gpu_only_for_a_cuda_device(monkeypatch):
    monkeypatch.setattr(runner.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runner.torch.cuda, "get_device_name", lambda device: f"GPU {device}")
    assert "gpu" not in environment("cpu") and "gpu" not in environment(None)
    assert environment("cuda:1")["gpu"] == "GPU cuda:1"


def test_a_model_that_is_no_vision_language_model_is_refused_by_its_kind(tmp_path):
    """The toy CLIP as --model: one line naming its kind, not transformers' list of every
    image-text-to-text config class."""
    from eval_suites.toyworld.assets_paths import toy_paths

    clip = toy_paths().clip
    settings = RunSettings(method="greedy", device="cpu", **{**BASE, "model": str(clip)})
    with pytest.raises(ValueError) as error:
        runner.load_vlm(settings)
    assert str(error.value) == (f"--model {clip} is a 'clip' model, not a vision-language one: "
                                "the protocols run a llava-hf LLaVA-1.5 / LLaVA-NeXT or "
                                "Qwen2.5-VL folder or hub id")


def test_settings_markdown_lists_each_setting_but_the_system_line():
    report = {"settings": {"method": "m", "system_prompt": "Be brief.", "seed": 55},
              "generate_kwargs": {"do_sample": False}, "steered_layer_input": 0,
              "environment": {"device": "cpu"}, "seconds_generating": 2.34,
              "generated_tokens": 17, "example_prompt": "USER: <image>\nQ ASSISTANT:"}
    assert settings_markdown(report) == "\n".join([
        "", "## Settings", "", "| setting | value |", "|---|---|", "| method | `m` |",
        "| seed | `55` |", "| generate | `{'do_sample': False}` |",
        "| steered at | input of decoder layer 0 |", "| environment | `{'device': 'cpu'}` |",
        "| time | 2.3 s for 17 tokens |", "", "Prompt as the model saw it (first item):", "",
        "```", "USER: <image>\nQ ASSISTANT:", "```", ""])


def test_a_report_write_killed_midway_leaves_the_old_report_whole(tmp_path, monkeypatch):
    """Written through a temporary file and a rename: a kill before the rename leaves the
    previous JSON as it was and no temporary file behind."""
    assert write_report(tmp_path, "pope", {"results": 1}, "old") == (
        tmp_path / "pope.json", tmp_path / "pope.md")

    def killed(src, dst):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(store.os, "replace", killed)
        write_report(tmp_path, "pope", {"results": 2}, "new")
    assert json.loads((tmp_path / "pope.json").read_text()) == {"results": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pope.json", "pope.md"]


def _question_files(protocol_data, tmp_path):
    """Two question files over four images, one of them grayscale, each file asking about
    them in another order."""
    images = tmp_path / "images"
    images.mkdir()
    names = sorted(p.name for p in (protocol_data / "images").iterdir())
    for i, name in enumerate(names):
        image = Image.open(protocol_data / "images" / name)
        (image.convert("L") if i == 1 else image).save(images / name)
    files = []
    for stem, order in (("first", names), ("second", names[::-1])):
        rows = [{"question_id": f"{stem}{i}", "image": name, "text": f"Is {stem} {i} there?",
                 "label": "yes"} for i, name in enumerate(order)]
        files.append(tmp_path / f"{stem}.jsonl")
        files[-1].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return images, files


def test_a_run_answers_in_batches_each_item_with_its_own_rgb_image(
        protocol_data, protocol_model_dir, tmp_path, monkeypatch):
    """Batches of the asked size reach the decoder (with the run's system line), each with its
    items' images as RGB; the report's example is the first file's first prompt, and it adds
    up every file's generation time and tokens (one counted second per batch)."""
    images, files = _question_files(protocol_data, tmp_path)
    seen = []

    def scripted(self, batch_images, prompts, max_new_tokens):
        seen.append((self.system_prompt, [(im.mode, im.tobytes()) for im in batch_images]))
        return [("Yes.", 3)] * len(prompts)

    monkeypatch.setattr(decoder.HFDecoder, "generate", scripted)
    monkeypatch.setattr(journal, "time", SimpleNamespace(perf_counter=itertools.count().__next__))
    out = tmp_path / "out"
    reproduce(["pope", "--model", str(protocol_model_dir), "--method", "regular", "--questions",
               *map(str, files), "--images", str(images), "--out", str(out), "--device", "cpu",
               "--batch-size", "2", "--system-prompt", "Be brief.", "--max-new-tokens", "3"])
    asked = [json.loads(line)["image"] for f in files for line in f.read_text().splitlines()]
    assert seen == [("Be brief.", [("RGB", Image.open(images / name).convert("RGB").tobytes())
                                   for name in asked[i:i + 2]]) for i in range(0, 8, 2)]
    report = json.loads((out / "pope.json").read_text())
    assert report["example_prompt"] == (  # the toy template writes no system turn
        "USER: <image>\nIs first 0 there? Please answer this question with one word. ASSISTANT:")
    assert (report["seconds_generating"], report["generated_tokens"]) == (4.0, 24)
    assert report["environment"]["device"] == "cpu"
    assert [row["n_tokens"] for row in read_jsonl(out / "pope_second.answers.jsonl")] == [3] * 4
    assert "| time | 4.0 s for 24 tokens |" in (out / "pope.md").read_text()
