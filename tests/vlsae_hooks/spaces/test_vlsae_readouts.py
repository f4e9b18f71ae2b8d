"""A readout beside a space that does not load (fitted on other space weights, another width,
unreadable): the space loads without it, a mode that reads it refuses with the reason the
readout's own load gives, the others steer exactly as with no readout file, and a save neither
rewrites nor copies it; a readout set in its place is read; ``load_readout=False`` reads none."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers.spaces import (
    patch_readout,
    small_space,
    space_with_patch_readout,
    space_with_readouts,
)

from vlsae_hooks import ConceptSpace, PatchReadout, VLSAESpace, attach
from vlsae_hooks.phrase_evidence import PhraseReadout
from vlsae_hooks.spaces import load_space
from vlsae_hooks.word_evidence import FINGERPRINT, WordReadout

torch.set_num_threads(1)
N_CONCEPTS = 64


def stale_word(folder: Path) -> None:
    """The word readout as a space retrained into its folder leaves it: fitted on other weights."""
    (folder / "word_readout.json").write_text(json.dumps({FINGERPRINT: "0" * 64}))


def narrow_phrases(folder: Path) -> None:
    """A phrase readout of another space's width (32 concepts)."""
    PhraseReadout(torch.zeros(32, 2), torch.zeros(2), torch.tensor([5, 6]), torch.zeros(2),
                  torch.tensor([7, 8])).save(folder)


def torn_patches(folder: Path) -> None:
    """A patch readout cut short (a broken copy)."""
    (folder / PatchReadout.FILE).write_bytes(b"truncated")


CASES = {  # the readout's attribute: how it breaks, its strict load, the options that read it
    "word_readout": (stale_word, lambda folder: WordReadout.load(folder, N_CONCEPTS),
                     {"mode": "evidence", "strength": 4.0}),
    "phrase_readout": (narrow_phrases, lambda folder: PhraseReadout.load(folder, N_CONCEPTS),
                       {"mode": "evidence", "phrase_strength": 1.0}),
    "patch_readout": (torn_patches, PatchReadout.load, {"mode": "grounding", "strength": 6.0}),
}

STEERS = ({"mode": "shift", "alpha": 2.0}, {"mode": "contrast", "alpha": 2.0},
          {"mode": "evidence", "strength": 4.0}, {"mode": "grounding", "strength": 6.0})
"""Every VL-SAE mode; each reads one readout, or none, of the space of ``saved_space``."""


def saved_space(model, name: str, folder: Path) -> Path:
    """A space holding every readout, saved into ``folder``, then its ``name`` readout broken."""
    space = space_with_readouts(model)
    space.patch_readout = patch_readout()
    space.save_pretrained(folder)
    CASES[name][0](folder)
    return folder


def logits(model, space, batch, **options) -> torch.Tensor:
    with torch.no_grad(), attach(model, space, **options):
        return model(**batch).logits


@pytest.mark.parametrize("name", CASES)
def test_only_the_modes_that_read_a_broken_readout_refuse_with_its_reason(tmp_path, model,
                                                                          batch, name):
    folder = saved_space(model, name, tmp_path / "space")
    _, strict_load, reads_it = CASES[name]
    with pytest.raises(ValueError) as strict:  # an explicit load stays strict
        strict_load(folder)
    with pytest.warns(UserWarning, match="The space is loaded without its"):
        space = load_space(folder)
    assert getattr(space, name) is None and space.refused_readouts == {name: str(strict.value)}
    assert len(space.readouts()) == 2  # the other two
    with pytest.raises(ValueError) as refused:
        attach(model, space, **reads_it)
    assert str(refused.value) == str(strict.value)  # what is wrong and how to refit it
    for kind in (WordReadout, PhraseReadout, PatchReadout):  # the same space with no such file
        if kind.FILE.startswith(name):
            (folder / kind.FILE).unlink()
    without = load_space(folder)
    for options in (options for options in STEERS if options != reads_it):
        assert torch.equal(logits(model, space, batch, **options),
                           logits(model, without, batch, **options))


def test_a_recommended_mode_that_reads_it_refuses_and_an_explicit_readout_steers(
        tmp_path, model, batch):
    folder = saved_space(model, "patch_readout", tmp_path / "space")
    (folder / "steering.json").write_text(json.dumps({"mode": "grounding", "strength": 6.0}))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="not a readable "
                                                                    "safetensors file"):
        attach(model, folder)
    with pytest.warns(UserWarning):
        space = load_space(folder)
    good = patch_readout().save(tmp_path / "readout")
    assert torch.equal(logits(model, space, batch, readout=str(good)),
                       logits(model, space_with_patch_readout(model), batch, mode="grounding",
                              strength=6.0))


def test_a_save_leaves_a_refused_readout_as_it_was_and_copies_it_nowhere(tmp_path, model):
    folder = saved_space(model, "word_readout", tmp_path / "space")
    before = {f.name: f.read_bytes() for f in folder.glob("word_readout.*")}
    with pytest.warns(UserWarning):
        space = load_space(folder)
    space.to(torch.float16).save_pretrained(folder)  # new weights over the old
    assert {f.name: f.read_bytes() for f in folder.glob("word_readout.*")} == before
    with pytest.warns(UserWarning, match="word_readout.safetensors was fitted on other weights"):
        assert load_space(folder).word_readout is None
    space.save_pretrained(tmp_path / "copy")
    assert not list((tmp_path / "copy").glob("word_readout.*"))
    assert load_space(tmp_path / "copy").refused_readouts == {}


def small_space_with_word_readout(folder: Path, n_concepts: int = 32) -> Path:
    """The 32-concept ``small_space`` saved into ``folder`` with a word readout of
    ``n_concepts`` rows beside it."""
    space = small_space()
    space.word_readout = WordReadout(torch.randn(n_concepts, 3), torch.zeros(3),
                                     torch.arange(5, 8), torch.zeros(3))
    space.save_pretrained(folder)
    return folder


def test_a_word_readout_of_another_width_is_refused_at_load(tmp_path):
    folder = small_space_with_word_readout(tmp_path, n_concepts=16)
    with pytest.warns(UserWarning, match="reads 16 concepts but the space has 32"):
        space = load_space(folder)
    assert space.word_readout is None
    assert "reads 16 concepts but the space has 32" in space.refused_readouts["word_readout"]


def test_a_readout_that_cannot_be_read_is_refused_not_raised(tmp_path, monkeypatch):
    folder = small_space_with_word_readout(tmp_path)

    def unreadable(cls, folder, *checks, **options):
        raise PermissionError(13, "Permission denied", str(Path(folder) / cls.FILE))

    monkeypatch.setattr(WordReadout, "load", classmethod(unreadable))
    with pytest.warns(UserWarning, match="Permission denied"):
        space = load_space(folder)
    assert space.word_readout is None and "Permission denied" in space.refused_readouts[
        "word_readout"]
    with pytest.raises(ValueError, match="Permission denied"):
        space.readout("word_readout")


def test_a_readout_set_after_a_refusal_is_the_one_read(tmp_path):
    folder = small_space_with_word_readout(tmp_path)
    stale_word(folder)
    with pytest.warns(UserWarning):
        space = load_space(folder)
    with pytest.raises(ValueError, match="fitted on other weights"):
        space.readout("word_readout")
    refit = WordReadout(torch.randn(32, 2), torch.zeros(2), torch.arange(5, 7), torch.zeros(2))
    space.word_readout = refit
    assert space.readout("word_readout") is refit
    assert space.readout("phrase_readout") is None  # none, and none refused


def test_load_readout_false_leaves_every_readout_unread(tmp_path):
    """Refitting a readout must not need the old one: it is neither loaded nor refused."""
    folder = small_space_with_word_readout(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert VLSAESpace.from_pretrained(folder, load_readout=False).word_readout is None
        stale_word(folder)
        space = VLSAESpace.from_pretrained(folder, load_readout=False)
    assert space.word_readout is None and space.refused_readouts == {}
    assert space.readout("word_readout") is None


def test_a_refused_readout_warns_at_the_callers_line_whatever_loads_it(tmp_path):
    """Not at a line of the library: a script that loads two spaces hears about both."""
    folder = small_space_with_word_readout(tmp_path)
    stale_word(folder)
    for load in (load_space, VLSAESpace.from_pretrained, ConceptSpace.from_pretrained):
        with pytest.warns(UserWarning, match="The space is loaded without its") as record:
            load(folder)
        assert [warning.filename for warning in record] == [__file__], load
