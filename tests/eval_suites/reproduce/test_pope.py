"""The paper's POPE protocol's own rules, with the decoder's answers scripted: a fresh seed
before each question file, and POPE's reading of the answers."""

import json

import pytest
from helpers.jsonl import read_jsonl
from helpers.protocol import QUICK

from eval_suites.core import decoder
from eval_suites.reproduce.__main__ import main as reproduce
from eval_suites.reproduce.pope import pope_markdown, read_questions


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
    prompts_seen = []
    monkeypatch.setattr(decoder.HFDecoder, "generate", lambda self, images, prompts, n: (
        prompts_seen.extend(prompts) or [("There is a dog.", 4)] * len(images)))
    _pope(protocol_data, protocol_model_dir, tmp_path, "vcd_random.jsonl")
    questions = read_jsonl(protocol_data / "pope" / "vcd_random.jsonl")
    assert prompts_seen == [q["text"] + " Please answer this question with one word."
                            for q in questions][:4]  # QUICK: --limit 4
    results = json.loads((tmp_path / "pope.json").read_text())["results"]
    assert results["vcd_random"]["yes_ratio"] == 1.0


def test_question_files_skip_blank_lines(tmp_path):
    rows = [{"question_id": i, "image": "a.png", "text": "?", "label": "yes"} for i in (1, 2)]
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n  \n" + json.dumps(rows[1]) + "\n")
    assert read_questions(path) == rows


def test_repeated_question_ids_are_refused(protocol_data, protocol_model_dir, tmp_path, capsys):
    image = sorted(p.name for p in (protocol_data / "images").iterdir())[0]
    row = {"question_id": 1, "image": image, "text": "?", "label": "no"}
    (tmp_path / "twice.jsonl").write_text((json.dumps(row) + "\n") * 2)
    with pytest.raises(SystemExit):
        reproduce(["pope", "--model", str(protocol_model_dir), "--method", "regular", *QUICK,
                   "--images", str(protocol_data / "images"), "--questions",
                   str(tmp_path / "twice.jsonl"), "--out", str(tmp_path / "out")])
    assert "twice repeats question ids" in capsys.readouterr().err


def test_markdown_columns_follow_the_header():
    scores = {"n": 5, "accuracy": 0.4, "precision": 0.25, "recall": 0.5, "f1": 1 / 3,
              "yes_ratio": 0.6}
    report = {"settings": {"method": "m", "model": "x"}, "results": {"f": scores},
              "generate_kwargs": {}, "steered_layer_input": None, "environment": "",
              "seconds_generating": 0.0, "generated_tokens": 0, "example_prompt": ""}
    assert "| f | 5 | 40.00 | 25.00 | 50.00 | 33.33 | 60.00 |" in pope_markdown(report)


def test_a_question_file_that_is_not_jsonl_or_empty_is_named_with_its_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "image": "a.png", "text": "?", "label": "yes"}\n'
                    '{"question_id": 2,\n')
    with pytest.raises(ValueError, match=rf"^{path}:2 is not JSON: Expecting property name"):
        read_questions(path)
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match=rf"^{path} holds no questions$"):
        read_questions(path)
