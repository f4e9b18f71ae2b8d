"""The paper's CHAIR protocol's own rules: its image selection follows the run's seed, ground
truth is found by file name or stem, and COCO's aliases apply to the captions it scores."""

import json
import random

from eval_suites.core import decoder
from eval_suites.reproduce.__main__ import main as reproduce
from eval_suites.reproduce.chair import chair_selection, truth_of


def test_chair_selection_follows_the_run_seed(tmp_path):
    for i in range(30):
        (tmp_path / f"{i:03d}.jpg").touch()
    names = sorted(p.name for p in tmp_path.iterdir())
    random.Random(3).shuffle(names)
    assert chair_selection(tmp_path, 7, 3) == names[:7]


def test_ground_truth_by_file_name_or_stem():
    assert truth_of("C_1.jpg", {"C_1.jpg": {"dog"}}) == {"dog"}  # COCO instances: file names
    assert truth_of("C_1.jpg", {"C_1": {"cat"}}) == {"cat"}  # an export keyed by image id
    assert truth_of("x.jpg", {"y.jpg": set()}) is None


def test_the_protocol_applies_cocos_rules(protocol_data, protocol_model_dir, tmp_path,
                                          monkeypatch):
    # CHAIR's rule: "baby elephant" names an elephant, not a person
    monkeypatch.setattr(decoder.HFDecoder, "generate",
                        lambda self, images, prompts, n: [("A baby elephant.", 3)] * len(images))
    names = sorted(p.name for p in (protocol_data / "images").iterdir())
    (tmp_path / "truth.json").write_text(json.dumps({n: ["elephant"] for n in names}))
    (tmp_path / "synonyms.json").write_text(json.dumps({"person": ["baby"], "elephant": []}))
    reproduce(["chair", "--model", str(protocol_model_dir), "--method", "greedy", "--images",
               str(protocol_data / "images"), "--ground-truth", str(tmp_path / "truth.json"),
               "--synonyms", str(tmp_path / "synonyms.json"), "--out", str(tmp_path / "out"),
               "--limit", "2", "--max-new-tokens", "3", "--system-prompt", "", "--device", "cpu"])
    results = json.loads((tmp_path / "out" / "chair.json").read_text())["results"]
    assert (results["chair_i"], results["chair_s"], results["recall"]) == (0.0, 0.0, 1.0)
