"""A toy training folder goes on where it stopped: finished stages are reused only under the
settings they were trained with, a new tower voids the LLaVA, and a stage killed midway resumes
from its checkpoint to the very weights of a run never stopped."""

import json
import logging
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoProcessor, CLIPModel, LlavaForConditionalGeneration

from eval_suites.toyworld.build import build_clip_processor, build_llava_processor
from eval_suites.toyworld.train import ToyTrainConfig, stage_settings, train_clip, train_llava
from eval_suites.toyworld.train_stages import Stages

torch.set_num_threads(1)


def stages(out, fresh: bool = False, **settings) -> Stages:
    """The stages of ``out`` for a run of ``ToyTrainConfig(**settings)``."""
    return Stages(out, stage_settings(ToyTrainConfig(**settings)), fresh)


def test_a_rerun_reuses_only_stages_trained_under_its_settings(tmp_path):
    clip, llava = tmp_path / "clip", tmp_path / "llava"
    for folder in (clip, llava):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
    stages(tmp_path, threads=2).finished("clip")  # llava: killed
    again = stages(tmp_path, threads=1)  # threads: the machine's
    assert again.reuse("clip", clip) and not again.reuse("llava", llava)
    with pytest.raises(ValueError, match=r"clip was trained under other settings \(changed: "
                                         r"\['clip_steps', 'seed'\]\); pass --fresh"):
        stages(tmp_path, seed=7, clip_steps=3).reuse("clip", clip)
    assert not stages(tmp_path, seed=7, fresh=True).reuse("clip", clip)


def test_settings_only_the_llava_reads_keep_the_tower(tmp_path):
    clip, llava = tmp_path / "clip", tmp_path / "llava"
    for folder in (clip, llava):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
    stages(tmp_path).finished("clip")
    stages(tmp_path).finished("llava")
    changed = stages(tmp_path, llava_steps=7, llava_scenes=3, llava_lr=1e-3, yes_no_turns=2)
    assert changed.reuse("clip", clip)
    with pytest.raises(ValueError, match=r"llava was trained under other settings \(changed: "
                                         r"\['llava_lr', 'llava_scenes', 'llava_steps', "
                                         r"'yes_no_turns'\]\)"):
        changed.reuse("llava", llava)
    with pytest.raises(ValueError, match=r"clip was trained under other settings \(changed: "
                                         r"\['patch_weight'\]\)"):
        stages(tmp_path, patch_weight=1.0).reuse("clip", clip)


def test_a_new_tower_voids_the_llava_and_fresh_forgets_the_old_notes(tmp_path):
    clip, llava = tmp_path / "clip", tmp_path / "llava"
    for folder in (clip, llava):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
    done = stages(tmp_path)
    with pytest.warns(UserWarning, match="settings were not noted"):  # trained before notes
        assert done.reuse("clip", clip) and done.reuse("llava", llava)  # both kept, not one
    assert set(json.loads((tmp_path / "stages.json").read_text())) == {"clip", "llava"}
    fresh = stages(tmp_path, fresh=True)
    assert json.loads((tmp_path / "stages.json").read_text()) == {}  # the old folder forgotten
    assert not stages(tmp_path).reuse("clip", clip)  # a fresh run killed: goes on, not back
    fresh.finished("clip")  # then killed while training the LLaVA on the new tower
    assert set(json.loads((tmp_path / "stages.json").read_text())) == {"clip"}
    assert not stages(tmp_path).reuse("llava", llava)
    stages(tmp_path).finished("llava")
    stages(tmp_path).finished("clip")  # clip/ deleted, retrained
    assert not stages(tmp_path).reuse("llava", llava)


TINY = dict(clip_steps=5, clip_batch=4, llava_steps=5, llava_scenes=2, yes_no_turns=1, threads=1)


def stop_at(monkeypatch, stop: int) -> None:
    """Kill training as it sets the learning rate of step ``stop`` (after step stop - 1)."""
    import eval_suites.toyworld.train as train

    cosine_lr = train._cosine_lr

    def killed(opt, base, step, total, warmup) -> None:
        if step == stop:
            raise KeyboardInterrupt
        cosine_lr(opt, base, step, total, warmup)

    monkeypatch.setattr(train, "_cosine_lr", killed)


def test_a_killed_stage_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, monkeypatch):
    cfg = ToyTrainConfig(**TINY)
    clip = train_clip(cfg)  # never stopped
    llava = train_llava(cfg, clip)
    stages = Stages(tmp_path, stage_settings(cfg), fresh=False)
    for stage, train in (("clip", lambda c: train_clip(cfg, c)),
                         ("llava", lambda c: train_llava(cfg, clip, c))):
        with monkeypatch.context() as patch:
            stop_at(patch, 3)
            with pytest.raises(KeyboardInterrupt):
                train(stages.checkpoint(stage, every=2))
        saved = torch.load(tmp_path / f"{stage}.checkpoint.pt", weights_only=True)
        assert saved["step"] == 1  # saved after steps 2 and 4; killed before step 4 (index 3)
        resumed = train(stages.checkpoint(stage, every=2))
        expected = (clip if stage == "clip" else llava).state_dict()
        for name, value in resumed.state_dict().items():
            assert torch.equal(value, expected[name]), name
        stages.finished(stage)
        assert not (tmp_path / f"{stage}.checkpoint.pt").exists()


def test_a_checkpoint_of_other_settings_is_refused_and_fresh_ignores_it(tmp_path, monkeypatch):
    cfg = ToyTrainConfig(**TINY)
    with monkeypatch.context() as patch:
        stop_at(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            train_clip(cfg, Stages(tmp_path, stage_settings(cfg), False).checkpoint("clip", 2))
    other = ToyTrainConfig(**{**TINY, "clip_lr": 1e-3})
    with pytest.raises(ValueError, match=r"clip.checkpoint.pt was saved under other settings "
                                         r"\(changed: \['clip_lr'\]\); pass --fresh"):
        train_clip(other, Stages(tmp_path, stage_settings(other), False).checkpoint("clip"))
    fresh = train_clip(other, Stages(tmp_path, stage_settings(other), True).checkpoint("clip"))
    torch.testing.assert_close(fresh.state_dict(), train_clip(other).state_dict(), rtol=0, atol=0)


def test_a_noted_stage_without_its_weights_is_trained_again(tmp_path):
    stages(tmp_path).finished("clip")
    (tmp_path / "clip").mkdir()  # its weights deleted, or never written
    assert not stages(tmp_path).reuse("clip", tmp_path / "clip")


def progress(seed: int) -> tuple[dict, torch.optim.Optimizer, np.random.Generator]:
    """Two modules, an optimizer with state (momentum) and a numpy generator, seeded."""
    torch.manual_seed(seed)
    modules = {"a": torch.nn.Linear(3, 2), "b": torch.nn.Linear(2, 1)}
    opt = torch.optim.SGD([p for m in modules.values() for p in m.parameters()], lr=0.1,
                          momentum=0.9)
    modules["b"](modules["a"](torch.randn(4, 3))).sum().backward()
    opt.step()
    return modules, opt, np.random.default_rng(seed)


def test_a_checkpoint_restores_every_module_the_optimizer_and_both_generators(tmp_path):
    checkpoint = stages(tmp_path).checkpoint("clip")
    assert checkpoint.path == tmp_path / "clip.checkpoint.pt"
    modules, opt, rng = progress(0)
    checkpoint.save(48, modules, opt, rng)
    assert not checkpoint.path.exists()  # saved every 50 steps: after steps 50, 100, ..
    checkpoint.save(49, modules, opt, rng)
    expected = (rng.random(), torch.rand(1))
    again, again_opt, again_rng = progress(1)
    assert checkpoint.resume(again, again_opt, again_rng) == 50
    for name, module in modules.items():
        torch.testing.assert_close(again[name].state_dict(), module.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(again_opt.state_dict(), opt.state_dict(), rtol=0, atol=0)
    assert (again_rng.random(), torch.rand(1)) == expected


def test_a_save_killed_midway_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch):
    checkpoint = stages(tmp_path).checkpoint("clip", every=1)
    modules, opt, rng = progress(0)
    checkpoint.save(0, modules, opt, rng)

    def killed(obj, path) -> None:
        with open(path, "wb") as file:
            file.write(b"half")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save(1, modules, opt, rng)
    assert checkpoint.resume(*progress(1)) == 1  # after step 0, as saved


def test_a_training_folder_holds_fp16_weights_that_load_as_fp32_and_a_rerun_reuses_them(
        tmp_path, monkeypatch):
    import eval_suites.toyworld.train as train

    cfg = ToyTrainConfig(**{**TINY, "clip_steps": 2, "llava_steps": 2})
    summary = train.train_toy_models(tmp_path, cfg)
    assert set(summary) == {"config", "clip_seconds", "llava_seconds"}
    assert summary["config"] == asdict(cfg)
    assert summary["clip_seconds"] > 0 and summary["llava_seconds"] > 0
    assert json.loads((tmp_path / "train_summary.json").read_text()) == summary
    for name, cls, processor in (("clip", CLIPModel, build_clip_processor()),
                                 ("llava", LlavaForConditionalGeneration, build_llava_processor())):
        with safe_open(tmp_path / name / "model.safetensors", "pt") as weights:
            assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F16"}
        model = cls.from_pretrained(tmp_path / name)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        saved = AutoProcessor.from_pretrained(tmp_path / name)
        assert saved.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    log = (tmp_path / "train.log").read_text()
    assert "config {" in log and "llava step=1 loss=" in log
    logger = logging.getLogger("eval_suites")  # the console's again once training ends
    assert logger.propagate and not any(isinstance(h, logging.FileHandler)
                                        for h in logger.handlers)

    def trained_again(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    llava_bytes = (tmp_path / "llava" / "model.safetensors").read_bytes()
    monkeypatch.setattr(train, "train_clip", trained_again)
    monkeypatch.setattr(train, "train_llava", trained_again)
    again = train.train_toy_models(tmp_path, replace(cfg, threads=2))
    assert again["config"]["threads"] == 2  # the machine's, not a setting of either stage
    assert (tmp_path / "llava" / "model.safetensors").read_bytes() == llava_bytes
