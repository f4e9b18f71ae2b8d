"""Every grounding control steers as its method does but for the one option that makes it the
control: ``-novision`` with image_weight 0 (image_source "none" for LexVLA), ``-wrongimage``
with image_source "other". A control
that silently ran its method (or the plain model) would make every table's control column lie.
Checked by recording what each method hands ``vlsae_hooks.attach`` (the -rawstate variants, which
build their own space, take their options from the same ``STEERED`` table: checked there)."""

from __future__ import annotations

import pytest
from helpers.spies import attach_calls

import eval_suites.toyworld.methods  # noqa: F401 - registers every toy method
from eval_suites.core.methods import METHODS
from eval_suites.toyworld.steered_methods import CONTROLS, STEERED, STEERING

LEXICAL_NOVISION = {"image_source": "none"}
"""Mode lexical's no-vision control: its options have no image_weight."""
CONTROLLED = sorted(name for name in METHODS
                    if name.endswith(tuple(f"-{control}" for control in CONTROLS))
                    and not name.endswith("-rawstate") and not name.startswith("vista"))


def attached_with(name: str, model, processor, monkeypatch) -> tuple[object, dict]:
    """(space, options) that method ``name`` attaches with (its space by class and config)."""
    *seen, _decoder = attach_calls(monkeypatch, METHODS[name], model, processor)
    assert len(seen) == 1, name
    space, options = seen[0]
    return (None if space is None else (type(space), space.config)), options


@pytest.mark.parametrize("name", CONTROLLED)
def test_a_control_is_its_method_with_one_option_changed(name, shipped_toy_llava, monkeypatch):
    model, processor = shipped_toy_llava
    base, control = name.rsplit("-", 1)
    space, options = attached_with(name, model, processor, monkeypatch)
    base_space, base_options = attached_with(base, model, processor, monkeypatch)
    change = (LEXICAL_NOVISION if name.startswith("lexvla") and control == "novision"
              else CONTROLS[control])
    assert space == base_space
    assert options == {**base_options, **change}
    assert all(base_options.get(key) != value for key, value in change.items())


def test_the_controls_table_covers_every_steering_method():
    assert set(CONTROLS) == {"novision", "wrongimage"}
    assert CONTROLS["novision"] == {"image_weight": 0.0}
    assert CONTROLS["wrongimage"] == {"image_source": "other"}
    for name, options in STEERING.items():
        for control, extra in CONTROLS.items():
            assert STEERED[f"{name}-{control}"] == {**options, **extra}
    assert STEERED["vlsae-words"] != STEERED["vlsae-evidence"]  # what phrases add is measured


def test_the_caption_grounding_reads_the_caption_fitted_readout(shipped_toy_llava, monkeypatch):
    from eval_suites.toyworld.grounding import CAPTIONS_FOLDER

    model, processor = shipped_toy_llava
    _, options = attached_with("vlsae-grounding-captions", model, processor, monkeypatch)
    assert options["readout"].endswith(CAPTIONS_FOLDER)
    assert "readout" not in attached_with("vlsae-grounding", model, processor, monkeypatch)[1]
