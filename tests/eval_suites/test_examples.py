"""Each script in examples/ runs end to end (random-weight toy models with random concept spaces,
so the outputs are noise; what is checked is that a user's copy works)."""

import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from helpers.toy_llava import save_random_toy_llava
from transformers import CLIPModel, LlavaForConditionalGeneration

from eval_suites.toyworld.build import build_clip_processor, build_tokenizer, clip_config
from vlsae_hooks.registry import SPACE_SUBFOLDER
from vlsae_hooks.testing import random_space

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    """toy_paths()-shaped folder: llava/ and clip/, each with a vlsae_space/."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("assets")
    llava_dir = save_random_toy_llava(root / "llava")
    random_space(LlavaForConditionalGeneration.from_pretrained(llava_dir), layer=2).save_pretrained(
        llava_dir / SPACE_SUBFOLDER)
    torch.manual_seed(0)
    CLIPModel(clip_config(build_tokenizer(for_clip=True))).save_pretrained(root / "clip")
    build_clip_processor().save_pretrained(root / "clip")
    clip = CLIPModel.from_pretrained(root / "clip")
    random_space(clip, site="clip_embeds", aligner=False).save_pretrained(
        root / "clip" / SPACE_SUBFOLDER)
    return root


def run(args: list[str], cwd: Path, extra_path: Path | None = None, env: dict | None = None) -> str:
    paths = [str(ROOT)] + ([str(extra_path)] if extra_path else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", **(env or {})}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_generate_plain_and_steered(toy_root, tmp_path):
    four_bit = ["--load-in-4bit"] if importlib.util.find_spec("bitsandbytes") else []
    out = run([sys.executable, str(EXAMPLES / "generate.py"), "--model", str(toy_root / "llava"),
               "--max-new-tokens", "4", *four_bit], tmp_path)
    assert out.count("plain:") == 2 and out.count("steered:") == 2


def test_generate_refuses_an_option_of_another_mode_with_a_message(toy_root, monkeypatch,
                                                                   capsys):
    code, message = refused_here("generate.py", ["--model", str(toy_root / "llava"), "--mode",
                                                 "grounding", "--alpha", "0.5",
                                                 "--max-new-tokens", "1"], monkeypatch, capsys)
    assert code == 2 and message.startswith("error: alpha is an option of shift, contrast, "
                                            "reference; mode 'grounding' takes")


def test_clip_zero_shot(toy_root, tmp_path):
    out = run([sys.executable, str(EXAMPLES / "clip_zero_shot.py"), "--model",
               str(toy_root / "clip")], tmp_path)
    assert ([line.split(":")[0].strip() for line in out.splitlines()]
            == ["plain", "concept", "combined"])
    assert "hit rate" in out


def test_train_space_and_the_same_command_again(toy_root, tmp_path):
    """Run again (as after a kill), it reuses its exported pairs: it exported them anew, and
    extraction refused its own activations as 'other data' (the shards' times had changed)."""
    command = ["bash", str(EXAMPLES / "train_space.sh"), "--model", str(toy_root / "llava"),
               "--out", str(tmp_path / "space"), "--max-samples", "48", "--epochs", "1"]
    assert "concept space:" in run(command, tmp_path)
    weights = tmp_path / "space" / "run" / "space" / "model.safetensors"
    first = weights.read_bytes()
    assert "concept space:" in run(command, tmp_path)
    assert weights.read_bytes() == first


def test_run_lmms_eval(toy_root, tmp_path):
    pytest.importorskip("lmms_eval")
    # the entry point `pip install -e .` would add
    site = tmp_path / "site" / "vlsae_entry-0.0.dist-info"
    site.mkdir(parents=True)
    (site / "METADATA").write_text("Metadata-Version: 2.1\nName: vlsae-entry\nVersion: 0.0\n")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    points = project["entry-points"]["lmms_eval.models"]
    (site / "entry_points.txt").write_text(
        "[lmms_eval.models]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()))
    run(["bash", str(EXAMPLES / "run_lmms_eval.sh"), "--model", str(toy_root / "llava"),
         "--method", "dola",
         "--tasks", "toyworld_pope_random,toyworld_chair", "--limit", "2", "--batch-size", "2",
         "--out", str(tmp_path / "lmms")], tmp_path, extra_path=site.parent,
        env={"HF_HOME": str(tmp_path / "hf"), "VLSAE_TOYWORLD_DIR": str(tmp_path / "toyworld")})
    assert list((tmp_path / "lmms").rglob("*_results.json"))


def shipped_toy_models() -> bool:
    from eval_suites.toyworld.assets_paths import TOY_DIR

    return all((TOY_DIR / name / SPACE_SUBFOLDER / "config.json").is_file()
               for name in ("llava", "clip"))


@pytest.mark.skipif(not shipped_toy_models(),
                    reason="the toy models and their spaces are not shipped yet")
@pytest.mark.parametrize("script", ["generate.py", "clip_zero_shot.py"])
def test_examples_run_on_the_shipped_toy_models_by_default(script, tmp_path):
    assert run([sys.executable, str(EXAMPLES / script)], tmp_path)


def refused_here(script: str, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Exit status and last stderr line of an example script's ``main`` that must stop on a
    user's mistake, run in this process: a refusal is the script's own argument and error
    handling, which needs no fresh interpreter (each script runs as a script above), and
    starting one costs seconds of imports per case. Any exception but the exit fails the test,
    as a traceback would."""
    spec = importlib.util.spec_from_file_location(f"example_{Path(script).stem}",
                                                  EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / script)])  # argparse's prog name
    with pytest.raises(SystemExit) as stopped:
        module.main(args)
    return stopped.value.code, capsys.readouterr().err.strip().splitlines()[-1]


def refused(args: list[str], cwd: Path) -> tuple[int, str]:
    """Exit code and last stderr line of an example that must stop on a user's mistake."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.returncode, done.stderr.strip().splitlines()[-1]


def test_generate_refuses_ordinary_mistakes_with_a_message(toy_root, tmp_path, monkeypatch,
                                                            capsys):
    (tmp_path / "notes.png").write_text("not an image")
    monkeypatch.chdir(tmp_path)
    model = ["--model", str(toy_root / "llava")]
    nope = tmp_path / "nope"
    assert refused_here("generate.py", ["--model", str(nope)], monkeypatch, capsys) == (
        2, f"generate.py: error: argument --model: no model folder or hub id '{nope}'; pass a "
           "saved model's folder or a hub id such as llava-hf/llava-1.5-7b-hf")
    assert refused_here("generate.py", [*model, "--max-new-tokens", "0"], monkeypatch,
                        capsys) == (
        2, "generate.py: error: argument --max-new-tokens: must be at least 1, got 0")
    for extra, message in (
            (["--images", str(nope) + ".png"],
             f"error: [Errno 2] No such file or directory: '{nope}.png'"),
            (["--images", "notes.png"], "error: cannot identify image file 'notes.png'"),
            (["--space", str(nope)], f"error: no concept space at '{nope}': not a directory")):
        assert refused_here("generate.py", [*model, "--max-new-tokens", "1", *extra],
                            monkeypatch, capsys) == (2, message)


def test_train_space_hands_its_prompt_to_the_extraction(tmp_path):
    """--prompt (Qwen2.5-VL needs "chat") reaches `sae_training extract`: there was no way to
    pass one, and a Qwen model failed in its processor on LLaVA's default prompt."""
    assert refused(["bash", str(EXAMPLES / "train_space.sh"), "--model", str(tmp_path),
                    "--data", str(tmp_path), "--out", str(tmp_path / "out"),
                    "--prompt", "no image"], tmp_path) == (
        2, "python -m sae_training: error: ExtractConfig.prompt needs '<image>' and '{caption}' "
           "(or 'chat')")


def test_clip_zero_shot_refuses_a_weight_outside_0_1_and_a_missing_model(tmp_path, monkeypatch,
                                                                          capsys):
    def refused_by_clip(args: list[str]) -> tuple[int, str]:
        return refused_here("clip_zero_shot.py", args, monkeypatch, capsys)

    for weight in ("5", "nan", "-0.1"):
        assert refused_by_clip(["--weight", weight]) == (
            2, f"clip_zero_shot.py: error: argument --weight: must lie in [0, 1], got {weight}")
    (tmp_path / "empty").mkdir()
    assert refused_by_clip(["--model", str(tmp_path / "empty")]) == (
        2, f"clip_zero_shot.py: error: argument --model: '{tmp_path / 'empty'}' is a folder "
           "without config.json, not a saved model; pass the folder the model was saved to")
    assert refused_by_clip(["--template", "a photo"]) == (
        2, "clip_zero_shot.py: error: argument --template: needs '{}' where the class name goes "
           "(every class would get the same prompt), got 'a photo'")
    (tmp_path / "llava").mkdir()  # a saved LLaVA's config: refused before any weight is read
    (tmp_path / "llava" / "config.json").write_text('{"model_type": "llava"}')
    assert refused_by_clip(["--model", str(tmp_path / "llava")]) == (
        2, f"error: {tmp_path / 'llava'} is a 'llava' model, not a CLIP one (CLIPModel): pass a "
           "CLIP folder or hub id")


def test_train_space_refuses_an_option_without_its_value(tmp_path):
    for args, flag in ((["--model"], "--model"), (["--model", "--out", "x"], "--model"),
                       (["--epochs", ""], "--epochs")):
        assert refused(["bash", str(EXAMPLES / "train_space.sh"), *args], tmp_path) == (
            2, f"error: {flag} needs a value, e.g. {flag} VALUE")
