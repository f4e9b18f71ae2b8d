"""The paper's POPE protocol's own rules, with the decoder's answers scripted: a fresh seed
before each question file, and POPE's reading of the answers."""

import json

from helpers.jsonl import read_jsonl
from helpers.protocol import QUICK

from eval_suites.core import decoder
from eval_suites.reproduce.__main__ import main as reproduce


def _pope(protocol_data, protocol_model_dir, out, *files: str, method: str = "regular"):
    pope = protocol_data / "pope"
    reproduce(["pope", "--model", str(protocol_model_dir), "--method", method,
               "--images", str(protocol_data / "images"), *QUICK, "--max-new-tokens", "6",
               "--questions", *(str(pope / f) for f in files), "--out", str(out)])


def test_each_question_file_is_sampled_from_a_fresh_seed(protocol_data, protocol_model_dir,
                                                         tmp_path):
    # "regular" samples (the reference's default): a file's answers are the same whether or not
    # another file ran before it
    _pope(protocol_data, protocol_model_dir, tmp_path / "both", "vcd_random.jsonl",
          "vcd_popular.jsonl")
    _pope(protocol_data, protocol_model_dir, tmp_path / "one", "vcd_popular.jsonl")
    name = "pope_vcd_popular.answers.jsonl"
    assert read_jsonl(tmp_path / "both" / name) == read_jsonl(tmp_path / "one" / name)


def test_answers_are_read_as_pope_reads_them(protocol_data, protocol_model_dir, tmp_path,
                                             monkeypatch):
    # POPE's reading: no "no" / "not" in the first sentence is a yes (the toy world's stricter
    # first-word reading would call this answer a no)
    monkeypatch.setattr(decoder.HFDecoder, "generate",
                        lambda self, images, prompts, n: [("There is a dog.", 4)] * len(images))
    _pope(protocol_data, protocol_model_dir, tmp_path, "vcd_random.jsonl")
    results = json.loads((tmp_path / "pope.json").read_text())["results"]
    assert results["vcd_random"]["yes_ratio"] == 1.0
