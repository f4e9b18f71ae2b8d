"""The POPE / CHAIR protocol commands under bad input: each mistake ends with a message that
says what to do (no traceback), before the model loads where it can, and a report records only
what the run used."""

import json

import pytest
import torch
from helpers.protocol import QUICK
from transformers import LlavaForConditionalGeneration

from eval_suites.reproduce import __main__ as reproduce_cli
from eval_suites.reproduce import runner
from eval_suites.reproduce.__main__ import main as reproduce
from eval_suites.reproduce.chair import coco_ground_truth, read_ground_truth, read_synonyms
from eval_suites.reproduce.pope import read_questions
from vlsae_hooks.testing import random_space

torch.set_num_threads(1)


def _refused(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of a protocol command that must stop without a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        reproduce(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_protocol_errors(protocol_data, protocol_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "image": "x.png", "text": "Is there?"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1 lacks \['label'\]"):
        read_questions(bad)
    bad.write_text(json.dumps({"question_id": 1, "image": "x.png", "text": "?", "label": "Y"}))
    with pytest.raises(ValueError, match="label 'Y'"):
        read_questions(bad)
    base = ["pope", "--model", str(protocol_model_dir), "--images", str(protocol_data / "images"),
            "--out", str(tmp_path / "o"), *QUICK]
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"question_id": 1, "image": "absent.png", "text": "?",
                                   "label": "no"}) + "\n")
    with pytest.raises(SystemExit):
        reproduce([*base, "--questions", str(missing)])
    assert "images of missing are not in" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a steered method, and no space ships with this model
        reproduce([*base, "--questions", str(protocol_data / "pope" / "vcd_random.jsonl")])
    assert "needs a concept space" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused before the model loads
        reproduce([*base, "--questions", str(protocol_data / "pope" / "vcd_random.jsonl"),
                   "--method", "greedy", "--device", "gpu0"])
    assert "error: device gpu0" in capsys.readouterr().err


def test_bad_options_are_refused_with_a_message_before_the_model_loads(
        protocol_data, protocol_model_dir, tmp_path, capsys):
    base = ["pope", "--model", str(protocol_model_dir), "--method", "greedy", "--questions",
            str(protocol_data / "pope" / "vcd_random.jsonl"),
            "--images", str(protocol_data / "images"), "--out", str(tmp_path / "o"), *QUICK]
    nope = tmp_path / "nope"
    assert _refused([*base, "--model", str(nope)], capsys) == (
        2, f"error: no model folder or hub id '{nope}'; pass a saved model's folder or a hub "
           "id such as llava-hf/llava-1.5-7b-hf\n")
    nope.mkdir()
    assert _refused([*base, "--model", str(nope)], capsys) == (
        2, f"error: '{nope}' is a folder without config.json, not a saved model; pass the "
           "folder the model was saved to\n")
    code, err = _refused([*base, "--dtype", "float8"], capsys)
    assert code == 2 and err.endswith("error: argument --dtype: invalid choice: 'float8' "
                                      "(choose from 'float16', 'bfloat16', 'float32')\n")
    for flag in ("--limit", "--max-new-tokens", "--num-beams", "--batch-size"):
        for value in ("0", "-1"):
            code, err = _refused([*base, flag, value], capsys)
            assert code == 2 and err.endswith(f"error: argument {flag}: must be at least 1, "
                                              f"got {value}\n")
    assert _refused([*base, "--alpha", "2", "--layer", "1"], capsys) == (
        2, "error: method 'greedy' runs the plain model, unsteered: it takes no --alpha, "
           "--layer; drop them or choose a vlsae method\n")
    assert _refused([*base, "--method", "regular", "--decoding", "greedy", "--temperature",
                     "0.3"], capsys) == (
        2, "error: method 'regular' with decoding 'greedy' decodes greedily: it takes no "
           "--temperature; drop it or sample (--decoding sample, or method 'sample')\n")
    assert _refused([*base, "--method", "regular", "--top-p", "5"], capsys) == (
        2, "error: top_p must lie in (0, 1], got 5.0\n")
    chair = ["chair", "--model", str(protocol_model_dir), "--method", "greedy",
             "--images", str(protocol_data / "images"),
             "--ground-truth", str(protocol_data / "chair" / "ground_truth.json"),
             "--synonyms", str(protocol_data / "chair" / "synonyms.json"),
             "--out", str(tmp_path / "c"), *QUICK]
    code, err = _refused([*chair, "--n-images", "0"], capsys)
    assert code == 2 and err.endswith("error: argument --n-images: must be at least 1, got 0\n")
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()  # nothing written


def test_run_settings_record_only_what_the_run_uses():
    from eval_suites.reproduce.settings import RunSettings

    base = dict(model="m", max_new_tokens=4, alpha=None)
    greedy = RunSettings(method="greedy", **base)
    assert (greedy.temperature, greedy.top_p) == (None, None)  # recorded as null, not 1.0
    sampled = RunSettings(method="regular", temperature=0.5, **base)
    assert (sampled.temperature, sampled.top_p) == (0.5, 1.0)
    assert [RunSettings(method="sample", top_p=p, **base).top_p for p in (0.9, 1)] == [0.9, 1]
    every = dict(space="s.pth", aux="a.pt", alpha=1.0, image_weight=1.0, contrast_weight=1.0,
                 plausibility_cutoff=1.0, layer=1, site="input")
    for options, message in (
            (dict(method="vlsae-x"), "unknown method 'vlsae-x'; choose one of ['greedy', "
             "'regular', 'sample', 'vlsae', 'vlsae-contrast', 'vlsae-evidence', "
             "'vlsae-grounding', 'vlsae-reference', 'vlsae-shift']"),
            (dict(method="vlsae", aux="a.pt"), "--aux belongs to a reference .pth given with "
             "--space"),
            (dict(method="vlsae", batch_size=0), "RunSettings.batch_size must be positive, got 0"),
            (dict(method="regular", **every), "method 'regular' runs the plain model, "
             "unsteered: it takes no --space, --aux, --alpha, --image-weight, --contrast-weight, "
             "--plausibility-cutoff, --layer, --site; drop them or choose a vlsae method"),
            (dict(method="vlsae", top_p=0.0), "top_p must lie in (0, 1], got 0.0"),
            (dict(method="vlsae", num_beams=0), "RunSettings.num_beams must be positive, got 0"),
            (dict(method="vlsae", limit=0), "RunSettings.limit must be positive, got 0"),
            (dict(method="vlsae", temperature=0.0), "temperature must be > 0, got 0.0"),
            (dict(method="vlsae", decoding="beam"),
             "RunSettings.decoding must be one of ('sample', 'greedy'), got 'beam'"),
            (dict(method="vlsae", dtype="float8"),
             "RunSettings.dtype must be one of ('float16', 'bfloat16', 'float32'), got 'float8'"),
            (dict(method="sample", space="s"), "method 'sample' runs the plain model, "
             "unsteered: it takes no --space; drop it or choose a vlsae method"),
            (dict(method="greedy", decoding="sample", top_p=0.9),
             "method 'greedy' with decoding 'sample' decodes greedily: it takes no --top-p; "
             "drop it or sample (--decoding sample, or method 'sample')")):
        with pytest.raises(ValueError) as error:
            RunSettings(**{**base, **options})
        assert str(error.value) == message


def test_errors_while_running_end_with_a_message(protocol_data, protocol_model_dir, tmp_path,
                                                 capsys, monkeypatch):
    """An option the method's mode lacks, a model that cannot be read (OSError) and Ctrl-C
    end the command with a line, not a traceback."""
    model = LlavaForConditionalGeneration.from_pretrained(protocol_model_dir)
    random_space(model, layer=1).save_pretrained(tmp_path / "space")
    base = ["pope", "--model", str(protocol_model_dir), "--questions",
            str(protocol_data / "pope" / "vcd_random.jsonl"),
            "--images", str(protocol_data / "images"), *QUICK]
    code, err = _refused([*base, "--method", "vlsae-grounding", "--space",
                          str(tmp_path / "space"), "--alpha", "2", "--out",
                          str(tmp_path / "a")], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == ("error: method 'vlsae-grounding' (mode grounding) takes no "
                                    "--alpha; drop it or choose a method that does")
    code, err = _refused([*base, "--method", "vlsae-contrast", "--space", str(tmp_path / "space"),
                          "--aux", str(tmp_path / "aux.pt"), "--out", str(tmp_path / "x")],
                         capsys)  # an auxiliary file belongs to a reference .pth, not a folder
    assert code == 2 and err.splitlines()[-1] == (
        f"error: SAE weights '{tmp_path / 'space'}' is a directory; expected the reference's "
        "torch.save file (.pth / .pt)")

    def unreadable(path, **kwargs):
        raise OSError(f"{path} does not appear to have a file named config.json")

    monkeypatch.setattr(runner.AutoModelForImageTextToText, "from_pretrained", unreadable)
    assert _refused([*base, "--method", "greedy", "--out", str(tmp_path / "b")], capsys) == (
        2, f"error: {protocol_model_dir} does not appear to have a file named config.json\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reproduce_cli, "run_pope", interrupted)
    assert _refused([*base, "--method", "greedy", "--out", str(tmp_path / "c")], capsys) == (
        130, "interrupted; rerun the same command to resume\n")


def test_chair_says_when_the_folder_holds_fewer_images_than_asked(
        protocol_data, protocol_model_dir, tmp_path, capsys):
    reproduce(["chair", "--model", str(protocol_model_dir), "--method", "greedy",
               "--images", str(protocol_data / "images"),
               "--ground-truth", str(protocol_data / "chair" / "ground_truth.json"),
               "--synonyms", str(protocol_data / "chair" / "synonyms.json"),
               "--out", str(tmp_path), *QUICK, "--limit", "1", "--max-new-tokens", "1"])
    assert (f"warning: {protocol_data / 'images'} holds only 4 images, fewer than the 500 "
            "asked for (--n-images): scoring 4\n") in capsys.readouterr().err
    report = json.loads((tmp_path / "chair.json").read_text())
    assert (report["n_images"], report["n_requested"], report["results"]["n"]) == (4, 500, 1)
    assert "**Only 4 images of the 500 asked for were in the folder.**" in (
        tmp_path / "chair.md").read_text()
    (tmp_path / "empty").mkdir()
    code, err = _refused(["chair", "--model", str(protocol_model_dir), "--method", "greedy",
                          "--images", str(tmp_path / "empty"),
                          "--ground-truth", str(protocol_data / "chair" / "ground_truth.json"),
                          "--synonyms", str(protocol_data / "chair" / "synonyms.json"),
                          "--out", str(tmp_path / "o"), *QUICK], capsys)
    assert (code, err) == (2, f"error: {tmp_path / 'empty'} holds no images; pass the COCO "
                              "val2014 folder as --images\n")
    from eval_suites.reproduce.chair import chair_selection  # here: absent before the fix

    with pytest.raises(ValueError, match=r"^n_images must be >= 1, got 0$"):
        chair_selection(protocol_data / "images", 0, 55)


def test_damaged_json_inputs_are_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"a.png": ["dog"\x01')
    with pytest.raises(ValueError) as error:
        read_ground_truth(bad)
    assert str(error.value) == (
        f"{bad} is not valid JSON (Expecting ',' delimiter: line 1 column 17 (char 16)); it "
        "should hold a JSON object {image: [object names]}: fix or replace the file")
    with pytest.raises(ValueError, match=rf"^{bad} is not valid JSON .*; it should hold a JSON "
                                         r"object \{object: \[phrases\]\}"):
        read_synonyms(bad)
    with pytest.raises(ValueError, match=rf"^{bad} is not valid JSON .*; it should hold COCO's "
                                         "instances_val2014.json"):
        coco_ground_truth(bad)
