"""The lmms-eval plugin: entry point, batching and order, generation arguments, and a real
``lmms-eval`` CLI run on exported toy-world tasks."""

import contextlib
import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")


from helpers.lmms import load, requests_for

from eval_suites.core.chair import ChairScorer
from eval_suites.core.decoder import HFDecoder
from eval_suites.lmms import manifest
from eval_suites.lmms.model import VLSAELlava, cut_at_stops, generate_kwargs
from eval_suites.toyworld.export import export_heldout
from eval_suites.toyworld.world import heldout_scenes

ROOT = Path(__file__).resolve().parents[3]
TASKS = ROOT / "eval_suites" / "toyworld" / "tasks"


def entry_points_from_pyproject() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["entry-points"]["lmms_eval.models"]


def test_pyproject_registers_the_model_through_an_import_light_entry_point():
    assert entry_points_from_pyproject() == {"vlsae_llava": "eval_suites.lmms:manifest"}
    found = manifest()
    assert (found.model_id, found.simple_class_path) == ("vlsae_llava",
                                                         "eval_suites.lmms.model.VLSAELlava")
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    registry.register_manifest(found)
    assert registry.get_model_class("vlsae_llava") is VLSAELlava
    loaded = subprocess.run([sys.executable, "-c", "import sys, eval_suites.lmms; print(sorted("
                             "{'torch', 'transformers', 'lmms_eval'} & set(sys.modules)))"],
                            capture_output=True, text=True, cwd=ROOT, check=True)
    assert loaded.stdout.strip() == "[]"


def test_generation_arguments_follow_lmms_eval_conventions():
    kwargs, until = generate_kwargs({"max_new_tokens": 16, "temperature": 0, "do_sample": True,
                                     "top_p": 0, "num_beams": 1, "until": "\n\n"})
    assert kwargs == {"max_new_tokens": 16, "do_sample": False, "num_beams": 1}
    assert until == ["\n\n"]
    kwargs, until = generate_kwargs({"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.2,
                                     "until": []})
    assert kwargs == {"max_new_tokens": 256, "do_sample": True, "num_beams": 1, "temperature": 0.7,
                      "top_p": 0.9, "repetition_penalty": 1.2} and until == []
    assert generate_kwargs({"num_beams": 3})[0]["num_beams"] == 3
    assert generate_kwargs({"temperature": 0.7, "do_sample": None})[0]["do_sample"]  # null
    assert not generate_kwargs({"temperature": 0.7, "do_sample": False})[0]["do_sample"]
    assert generate_kwargs({"max_new_tokens": None})[0]["max_new_tokens"] == 256  # left null
    assert cut_at_stops("yes. and more\n\nlater", ["\n\n", "."]) == "yes"


def test_batched_answers_come_back_in_request_order():
    from eval_suites.toyworld.assets_paths import toy_paths

    images = [s.image for s in heldout_scenes(5, 5)]
    prompts = ["Describe the image.", "Is there a red star in the image?", "What is in the image?",
               "Describe the image.", "Is there a blue ring in the image?"]
    short, long = {"max_new_tokens": 3, "temperature": 0}, {"max_new_tokens": 6, "temperature": 0}
    gen = [long, short, long, short, long]
    model = VLSAELlava(pretrained=str(toy_paths().llava), batch_size=2)  # trained: answers differ
    model.task_dict = {"toy": {"test": [{"image": im} for im in images]}}
    answers = model.generate_until(requests_for(images, prompts, gen))
    assert len(set(answers)) == len(answers)  # so that a swap within a batch shows
    one_by_one = HFDecoder(model.model, model.processor, do_sample=False)
    for image, prompt, g, answer in zip(images, prompts, gen, answers):
        assert answer == one_by_one.generate([image], [prompt], g["max_new_tokens"])[0][0]
    stop = answers[0].split()[1]
    cut = model.generate_until(requests_for(images[:1], prompts[:1], [{**long, "until": [stop]}]))
    assert cut == [answers[0].split(stop)[0].strip()]
    with pytest.raises(NotImplementedError, match="generate_until"):
        model.loglikelihood([])
    with pytest.raises(NotImplementedError):
        model.generate_until_multi_round([])
    assert model.device == torch.device("cpu")


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
@pytest.mark.parametrize("method", ["greedy", "vlsae-contrast", "vlsae-shift"])
def test_a_llava_next_or_qwen_folder_answers_batched_as_one_by_one(family, method, tmp_path):
    """pretrained= a LLaVA-NeXT or Qwen2.5-VL folder (model, processor and a space saved there):
    images of three shapes, one, two and no images a request, answer batched as one by one."""
    from PIL import Image

    from vlsae_hooks.testing import random_space, tiny_llava_next, tiny_processor, tiny_qwen2_5_vl

    tiny = {"llava_next": tiny_llava_next, "qwen2_5_vl": tiny_qwen2_5_vl}[family]()
    tiny.save_pretrained(tmp_path)
    tiny_processor(tiny).save_pretrained(tmp_path)
    random_space(tiny, layer=2).save_pretrained(tmp_path / "vlsae_space")
    g = torch.Generator().manual_seed(7)
    a, b, c = (Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g,
                                             dtype=torch.uint8).numpy())
               for h, w in [(32, 64), (64, 32), (40, 40)])
    docs = [{"images": [a]}, {"images": [b, c]}, {"images": []}, {"images": [c]}]
    options = {} if method == "greedy" else dict(alpha=3.0, image_weight=1.0)
    answers = []
    for name, batch_size in ((method, 4), (method, 1), ("greedy", 4)):
        # the random space names a model of its own ('vlsae-toy/random'), not this folder's: a
        # steered method warns that the space was trained for another model
        with (pytest.warns(UserWarning, match="space was trained for 'vlsae-toy/random'")
              if name != "greedy" else contextlib.nullcontext()):
            model = VLSAELlava(pretrained=str(tmp_path), method=name, batch_size=batch_size,
                               **(options if name == method else {}))
        model.task_dict = {"toy": {"test": docs}}
        answers.append(model.generate_until(requests_for(
            [], ["w1 w2", "w3", "w4 w5", "w6"], [{"max_new_tokens": 3, "until": []}] * 4,
            visual=lambda doc: doc["images"])))
    assert answers[0] == answers[1] and len(set(answers[0])) > 1
    assert (answers[0] == answers[2]) == (method == "greedy")  # the space in the folder steers


def test_methods_and_their_options_are_checked(toy_llava_dir):
    with pytest.raises(ValueError, match="unknown method"):
        VLSAELlava(pretrained=str(toy_llava_dir), method="nope")
    with pytest.raises(ValueError, match="cd_alpha"):
        VLSAELlava(pretrained=str(toy_llava_dir), method="vcd", alpha=1.0)
    with pytest.raises(ValueError, match="device gpu0"):
        VLSAELlava(pretrained=str(toy_llava_dir), device="gpu0")
    vcd = VLSAELlava(pretrained=str(toy_llava_dir), method="vcd", cd_alpha=0.5, batch_size=3)
    assert vcd.steering.alpha == 0.5
    images = [s.image for s in heldout_scenes(5, 3)]
    vcd.task_dict = {"toy": {"test": [{"image": im} for im in images]}}
    describe = requests_for(images, ["Describe the image."] * 3, [{"max_new_tokens": 2}] * 3)
    assert len(vcd.generate_until(describe)) == 3
    assert len(vcd.generate_until(requests_for(images[:1], ["Describe the image."],
                                               [{"num_beams": 2, "max_new_tokens": 2}]))) == 1


def test_lmms_eval_cli_runs_the_toy_world_tasks(toy_llava_dir, tmp_path):
    data = tmp_path / "toyworld"
    export_heldout(data, seed=4, n_images=3)
    # the entry point as an installed package would declare it, read from pyproject.toml
    dist = tmp_path / "site" / "vlsae_entry-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vlsae-entry\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[lmms_eval.models]\n" + "".join(
        f"{name} = {target}\n" for name, target in entry_points_from_pyproject().items()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path / "site")]),
           "VLSAE_TOYWORLD_DIR": str(data), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "vlsae_llava",
                          "--model_args", f"pretrained={toy_llava_dir},method=greedy",
                          "--tasks", "toyworld_pope,toyworld_chair", "--include_path", str(TASKS),
                          "--limit", "4", "--batch_size", "3", "--log_samples",
                          "--output_path", str(out), "--verbosity", "DEBUG"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(next(out.rglob("*_results.json")).read_text())["results"]
    assert {"toyworld_pope_random", "toyworld_pope_popular", "toyworld_pope_adversarial",
            "toyworld_pope_negated", "toyworld_pope_binding", "toyworld_chair"} <= set(results)

    model = HFDecoder(*load(toy_llava_dir), do_sample=False)
    pope = samples(out, "toyworld_pope_random")
    assert len(pope) == 4
    import datasets

    rows = datasets.load_dataset("parquet", data_files=str(data / "pope" / "random.parquet"),
                                 split="train", cache_dir=str(tmp_path / "hf"))
    for sample in pope:
        row = rows[sample["doc_id"]]
        want = model.generate([row["image"]], [row["question"]], 8)[0][0]
        assert sample["filtered_resps"] == want
    accuracy = sum(s["filtered_resps"].lower().strip() == s["target"] for s in pope) / len(pope)
    assert results["toyworld_pope_random"]["pope_accuracy,none"] == pytest.approx(accuracy)
    said_yes = sum(s["filtered_resps"].lower().strip() == "yes" for s in pope) / len(pope)
    truth_yes = sum(s["target"] == "yes" for s in pope) / len(pope)
    assert results["toyworld_pope_random"]["pope_answer_yes_ratio_gap,none"] == pytest.approx(
        abs(said_yes - truth_yes))
    directions = json.loads(next(out.rglob("*_results.json")).read_text())["higher_is_better"]
    assert directions["toyworld_pope_random"]["pope_answer_yes_ratio"] is None

    chair = samples(out, "toyworld_chair")
    scorer = ChairScorer(json.loads((data / "chair" / "synonyms.json").read_text()),
                         per_mention=False)  # the toy world's CHAIR
    want = scorer.score([s["filtered_resps"] for s in chair],
                        [set(s["toyworld_chair_s"]["objects"]) for s in chair])
    chair_i = results["toyworld_chair"]["toyworld_chair_i,none"]
    if want["chair_i"] is None:  # captions that name nothing: no CHAIR_I, nan in lmms-eval
        assert math.isnan(chair_i)
    else:
        assert chair_i == pytest.approx(want["chair_i"])
    assert results["toyworld_chair"]["toyworld_chair_mean_len,none"] == pytest.approx(
        want["mean_len"])


def samples(out: Path, task: str) -> list[dict]:
    """The samples lmms-eval logged for ``task`` under ``out``."""
    lines = next(out.rglob(f"*_samples_{task}.jsonl")).read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_answer_yes_ratio_is_reported_without_a_direction_and_its_gap_as_lower_is_better():
    import yaml

    from eval_suites.toyworld.tasks import utils

    docs = [{"question_id": i, "answer": a} for i, a in enumerate(["yes", "no", "no", "no"])]
    results = [utils.toyworld_pope_process_results(doc, [answer])
               for doc, answer in zip(docs, ["Yes", "yes", "no", "yes"])]
    ratio = utils.pope_aggregate_answer_yes_ratio([r["pope_answer_yes_ratio"] for r in results])
    gap = utils.pope_aggregate_answer_yes_ratio_gap(
        [r["pope_answer_yes_ratio_gap"] for r in results])
    assert (ratio, gap) == (0.75, 0.5)
    text = (TASKS / "_toyworld_pope_template.yaml").read_text().replace("!function", "")
    metrics = {m["metric"]: m["higher_is_better"] for m in yaml.safe_load(text)["metric_list"]}
    assert (metrics["pope_answer_yes_ratio"], metrics["pope_answer_yes_ratio_gap"]) == (None, False)


def test_toyworld_chair_i_is_nan_when_the_captions_name_nothing(tmp_path, monkeypatch):
    from eval_suites.toyworld.tasks import utils

    export_heldout(tmp_path, seed=7, n_images=2)
    monkeypatch.setenv(utils.ENV_VAR, str(tmp_path))
    items = [{"image_id": "a", "caption": "a dark background", "objects": ["red star"]},
             {"image_id": "b", "caption": "nothing at all", "objects": ["blue ring"]}]
    assert math.isnan(utils.chair_aggregate_i(items))  # 0 of 0 named: no score, not a perfect 0
    assert utils.chair_aggregate_s(items) == 0
    items[1]["caption"] = "a red star"
    assert utils.chair_aggregate_i(items) == 1
