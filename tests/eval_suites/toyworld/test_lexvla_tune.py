"""The ``lexvla`` methods hand their options to the hooks, steered only by naming units mapped
onto the evaluated model's own words; ``lexvla_tune`` registers one method per strength and
compares them with greedy on the dev seed (the hooks and the comparison stubbed)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch

import eval_suites.toyworld.__main__ as toyworld_cli
import eval_suites.toyworld.lexvla_method as lexvla_method
from eval_suites.core.methods import METHODS
from eval_suites.toyworld.lexvla_tune import main, register_strengths, strength_list
from vlsae_hooks.spaces.lexvla import UNMAPPED


@pytest.fixture
def registry():
    """``METHODS`` as it was before the test (a test's strengths stay out of later ones)."""
    before = dict(METHODS)
    yield METHODS
    METHODS.clear()
    METHODS.update(before)


class FakeSpace:
    """Words as the toy LexVLA's: naming units, an answer word, a phrase, punctuation."""

    words = ["red", "yes", "red star", "."]

    def __init__(self):
        self.tokenizers = []
        self.vlm_token_ids = torch.tensor([0, 0, 0, 0])

    def set_vlm_vocabulary(self, tokenizer):
        self.tokenizers.append(tokenizer)
        self.vlm_token_ids = torch.tensor([10, 11, 13, 12])


@pytest.fixture
def attached(monkeypatch):
    """The space the methods load, and the (space, options) each ``attach`` is given."""
    space, calls = FakeSpace(), []

    class Hooks:
        def __init__(self, model, space, **options):
            calls.append((model, space, options))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(lexvla_method, "toy_lexvla_space", lambda: space)
    monkeypatch.setattr(lexvla_method.vlsae_hooks, "attach", Hooks)
    return space, calls


def processor():
    return SimpleNamespace(tokenizer=SimpleNamespace(padding_side="right"))


@pytest.mark.parametrize(("name", "image_source"), [
    ("lexvla", "own"), ("lexvla-novision", "none"), ("lexvla-wrongimage", "other")])
def test_each_variant_steers_greedy_decoding_with_its_image_source(attached, name,
                                                                   image_source):
    space, calls = attached
    proc = processor()
    with METHODS[name]("model", proc) as decoder:
        assert calls == [("model", space, {"strength": lexvla_method.STRENGTH,
                                           "image_source": image_source})]
        assert decoder.kwargs == {"do_sample": False} and decoder.model == "model"
    # mapped onto the evaluated model's words, then every unit naming nothing unmapped
    assert space.tokenizers == [proc.tokenizer]
    assert space.vlm_token_ids.tolist() == [10, UNMAPPED, 13, UNMAPPED]


def test_a_tuned_strength_reaches_the_hooks(attached, registry):
    _, calls = attached
    assert register_strengths([1.0, 2.5]) == ["lexvla-s1", "lexvla-s2.5"]
    with METHODS["lexvla-s2.5"]("model", processor()):
        pass
    assert calls[0][2] == {"strength": 2.5, "image_source": "own"}


def test_a_missing_toy_lexvla_names_how_to_train_it(monkeypatch, tmp_path):
    monkeypatch.setattr(lexvla_method, "TOY_DIR", tmp_path)
    lexvla_method.toy_lexvla_space.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="no toy LexVLA at .*; train it with"):
            lexvla_method.toy_lexvla_space()
    finally:
        lexvla_method.toy_lexvla_space.cache_clear()


def test_strengths_are_finite_numbers_zero_included():
    assert strength_list("0,1.5,8") == [0.0, 1.5, 8.0]
    for text in ("inf", "1,nan", "-0.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="finite numbers >= 0"):
            strength_list(text)


def test_tuning_compares_greedy_and_each_strength_on_the_dev_seed(monkeypatch, tmp_path,
                                                                  registry):
    argvs = []
    monkeypatch.setattr(toyworld_cli, "main", argvs.append)
    main(["--out", str(tmp_path / "a")])
    main(["--strengths", "0.5,3", "--n-images", "7", "--out", str(tmp_path / "b")])
    assert argvs == [
        ["compare", "--seed", "1", "--n-images", "200", "--out", str(tmp_path / "a"),
         "--methods", "greedy,lexvla-s1,lexvla-s2,lexvla-s4,lexvla-s8"],
        ["compare", "--seed", "1", "--n-images", "7", "--out", str(tmp_path / "b"),
         "--methods", "greedy,lexvla-s0.5,lexvla-s3"]]
    assert {"lexvla-s0.5", "lexvla-s3", "lexvla-s8"} <= set(METHODS)


def test_a_count_below_one_is_refused_by_the_tuning_command_itself(monkeypatch, capsys,
                                                                   registry):
    """``--n-images 0`` reached ``compare``, whose parser refused it under its own name, after
    every strength was registered."""
    argvs = []
    monkeypatch.setattr(toyworld_cli, "main", argvs.append)
    with pytest.raises(SystemExit) as exit_:
        main(["--strengths", "0.25", "--n-images", "0", "--out", "x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and argvs == [] and "lexvla-s0.25" not in METHODS
    assert err.startswith("usage: python -m eval_suites.toyworld.lexvla_tune ")
    assert "argument --n-images: must be at least 1, got 0" in err
