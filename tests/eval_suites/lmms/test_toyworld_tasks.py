"""The toy-world lmms-eval tasks find their export through ``VLSAE_TOYWORLD_DIR``, and say what
to run when it is unset or names no export."""

import json

import pytest

pytest.importorskip("lmms_eval")

from eval_suites.toyworld.tasks.utils import (  # noqa: E402
    ENV_VAR,
    chair_aggregate_i,
    pope_aggregate_answer_yes_ratio_gap,
    toyworld_dir,
)


def test_an_unset_variable_names_the_export_command(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(RuntimeError, match=rf"set {ENV_VAR} to a folder written by "
                                           r"`python -m eval_suites.toyworld export"):
        toyworld_dir()


def test_a_folder_without_an_export_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"{ENV_VAR}={tmp_path} holds no toy-world "
                                                r"export \(no manifest.json\)"):
        toyworld_dir()
    (tmp_path / "manifest.json").write_text("{}")
    assert toyworld_dir() == tmp_path


def test_chair_i_is_nan_when_no_caption_names_an_object_and_the_yes_gap_is_absolute(
        tmp_path, monkeypatch):
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "chair").mkdir()
    (tmp_path / "chair" / "synonyms.json").write_text(json.dumps({"star": ["star", "stars"]}))
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    items = [{"caption": "nothing here.", "objects": ["star"]}]
    assert chair_aggregate_i(items) != chair_aggregate_i(items)  # nan
    named = [{"caption": "a star and a stars.", "objects": []}]
    assert chair_aggregate_i(named) == 1.0
    answers = [{"prediction": "yes", "ground_truth": "no"}] * 3 + [
        {"prediction": "no", "ground_truth": "yes"}]
    assert pope_aggregate_answer_yes_ratio_gap(answers) == pytest.approx(0.5)
