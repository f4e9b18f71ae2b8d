"""What the steered toy-world methods and the oracle upper bound hand ``vlsae_hooks.attach`` (the
tuned tables as documented, "yes" as its token id, the oracle readouts in place of the space's
own), that each decodes greedily, and how the oracle readouts are refused."""

import json
import shutil

import pytest
import torch
from helpers.spies import attach_calls
from safetensors import safe_open
from safetensors.torch import save_file

import eval_suites.toyworld.methods  # noqa: F401 - registers every toy method
from eval_suites.core.methods import METHODS
from eval_suites.toyworld import oracle_methods
from eval_suites.toyworld.assets_paths import TOY_DIR
from eval_suites.toyworld.spaces import EVIDENCE_STEERING, ORACLE_READOUT_FOLDER
from eval_suites.toyworld.steered_methods import CUTOFF, STEERING
from vlsae_hooks.phrase_evidence import PhraseReadout
from vlsae_hooks.word_evidence import WordReadout

SPACE = TOY_DIR / "llava" / "vlsae_space"
ORACLE = TOY_DIR / "llava" / ORACLE_READOUT_FOLDER


def test_the_steering_table_is_the_tuned_one():
    assert STEERING["vlsae"] == {} and STEERING["vlsae-reference"] == {"mode": "reference"}
    assert STEERING["vlsae-contrast"] == {"mode": "contrast"}
    assert STEERING["vlsae-shift"] == {"mode": "shift"}
    assert STEERING["vlsae-evidence"] == {**EVIDENCE_STEERING, "affirm_words": ["yes"]}
    assert STEERING["vlsae-words"] == {**EVIDENCE_STEERING, "strength": 5.0,
                                       "phrase_strength": 0.0, "affirm_words": ["yes"]}
    assert CUTOFF == {"mode": "contrast", "contrast_weight": 0.0, "plausibility_cutoff": 0.8}


@pytest.mark.parametrize("name", ["vlsae-evidence", "vlsae-words-wrongimage", "vlsae-cutoff"])
def test_steered_methods_pass_yes_as_its_token_id_and_decode_greedily(name, shipped_toy_llava,
                                                                     monkeypatch):
    model, processor = shipped_toy_llava
    (space, options), decoder = attach_calls(monkeypatch, METHODS[name], model, processor)
    assert space is None  # the model's registered space, found by attach
    assert "affirm_words" not in options
    if name != "vlsae-cutoff":
        assert options["affirm_token_ids"] == [processor.tokenizer.convert_tokens_to_ids("yes")]
    assert decoder.kwargs == {"do_sample": False}


def test_the_oracle_recipe_is_kept_as_it_was():
    assert oracle_methods.ORACLE_STEERING == {"mode": "evidence", "strength": 1.0,
                                              "phrase_strength": 4.0, "affirm": 0.35}
    assert oracle_methods.ORACLE_AFFIRM_WORDS == ("yes",)


@pytest.mark.parametrize("control", ["", "-novision", "-wrongimage"])
def test_oracle_method_attaches_the_oracle_readouts_with_the_old_recipe(control, shipped_toy_llava,
                                                                        monkeypatch):
    model, processor = shipped_toy_llava
    (space, options), decoder = attach_calls(monkeypatch, METHODS[f"vlsae-oracle-data{control}"],
                                             model, processor)
    extra = oracle_methods.CONTROLS[control[1:]] if control else {}
    yes = processor.tokenizer.convert_tokens_to_ids(["yes"])
    assert options == {**oracle_methods.ORACLE_STEERING, "affirm_token_ids": yes, **extra}
    for readout, cls in ((space.word_readout, WordReadout), (space.phrase_readout, PhraseReadout)):
        with safe_open(str(ORACLE / cls.FILE), "pt") as file:
            assert type(readout) is cls
            for name in cls.TENSORS:
                assert torch.equal(getattr(readout, name), file.get_tensor(name)), name
            assert readout.pool == file.metadata()["pool"]
    assert decoder.kwargs == {"do_sample": False}


def test_oracle_method_refuses_a_model_without_a_space(monkeypatch):
    from vlsae_hooks.testing import tiny_llava

    with pytest.raises(ValueError, match="needs the toy LLaVA's vlsae_space"):
        attach_calls(monkeypatch, METHODS["vlsae-oracle-data"], tiny_llava(), None)


@pytest.fixture
def copies(tmp_path):
    """The toy LLaVA's space and oracle readouts, copied side by side."""
    shutil.copytree(SPACE, tmp_path / "vlsae_space")
    shutil.copytree(ORACLE, tmp_path / ORACLE_READOUT_FOLDER)
    return tmp_path / "vlsae_space", tmp_path / ORACLE_READOUT_FOLDER


def oracle_readout(cls, oracle, space, n_concepts):
    """``cls`` loaded as ``oracle_space`` loads it."""
    return cls.load(oracle, n_concepts, space_folder=space,
                    how_to_fit=f"with {oracle_methods.REFIT}")


@pytest.mark.parametrize("cls", [WordReadout, PhraseReadout])
def test_each_oracle_readout_of_other_weights_is_refused(cls, copies):
    space, oracle = copies
    info_path = oracle / cls.FILE.replace(".safetensors", ".json")
    info = json.loads(info_path.read_text())
    info["space_sha256"] = "0" * 64
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=f"{cls.FILE} was fitted on other weights"):
        oracle_methods.oracle_space(space)


def test_an_oracle_readout_of_another_width_is_refused(copies):
    space, oracle = copies
    n = json.loads((space / "config.json").read_text())["n_concepts"]
    with pytest.raises(ValueError, match=f"reads {n} concepts but the space has {n + 1}.*"
                                         "refit it with .*--oracle-readout-data"):
        oracle_readout(WordReadout, oracle, space, n + 1)


@pytest.mark.parametrize("cls", [WordReadout, PhraseReadout])
@pytest.mark.parametrize("lost", ["json", "safetensors"])
def test_a_missing_oracle_file_names_itself_and_the_command(cls, lost, copies):
    space, oracle = copies
    (oracle / cls.FILE.replace(".safetensors", f".{lost}")).unlink()
    what = {"json": r"has no \w+_readout\.json naming the space weights .* refit it",
            "safetensors": r"has no \w+_readout\.safetensors \(its \w+ readout\); fit one"}[lost]
    with pytest.raises(FileNotFoundError, match=f"{what} with .*--oracle-readout-data"):
        oracle_methods.oracle_space(space)


def test_an_oracle_file_without_its_pool_or_a_tensor_is_refused(copies):
    """A word readout that records no pool is a mean-pooled one (as ``WordReadout.load`` reads
    it); a phrase readout has no such default, and a missing tensor is named."""
    space, oracle = copies
    n = json.loads((space / "config.json").read_text())["n_concepts"]
    for cls in (WordReadout, PhraseReadout):
        with safe_open(str(oracle / cls.FILE), "pt") as file:
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
        save_file(tensors, str(oracle / cls.FILE))  # no metadata
    assert oracle_readout(WordReadout, oracle, space, n).pool == "mean"
    with pytest.raises(ValueError, match="does not record the pool.*--oracle-readout-data"):
        oracle_readout(PhraseReadout, oracle, space, n)
    del tensors["first_ids"]
    save_file(tensors, str(oracle / PhraseReadout.FILE), metadata={"pool": "max_scores"})
    with pytest.raises(ValueError, match=r"lacks \['first_ids'\]; refit it with "):
        oracle_readout(PhraseReadout, oracle, space, n)
