"""The mode registry and each mode's options: validation that names the field, options of
another mode refused naming it, a toy mode registered in one call, ``handle.options``."""

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import vlsae_hooks
from vlsae_hooks import (
    ContrastOptions,
    EvidenceOptions,
    GroundingOptions,
    LexicalOptions,
    ReferenceOptions,
    ShiftOptions,
    attach,
)
from vlsae_hooks.modes import Steerer, mode_names, modes_taking, register_mode
from vlsae_hooks.modes.registry import _MODES, NoOpSteering
from vlsae_hooks.testing import left_pad, llava_prompt

torch.set_num_threads(1)

OPTIONS = {"contrast": ContrastOptions, "reference": ReferenceOptions, "shift": ShiftOptions,
           "evidence": EvidenceOptions, "lexical": LexicalOptions, "grounding": GroundingOptions}
NUMBERS = {  # (class, field, a bad value in range terms)
    ContrastOptions: {"alpha": -1.0, "image_weight": 1.5, "contrast_weight": 2.0,
                      "plausibility_cutoff": -0.1},
    ShiftOptions: {"alpha": -0.5, "image_weight": -0.1},
    EvidenceOptions: {"strength": -1.0, "affirm": -1.0, "phrase_strength": -2.0,
                      "image_weight": 1.01},
    LexicalOptions: {"strength": -4.0},
    GroundingOptions: {"strength": -1.0, "threshold": 1.5, "image_weight": -0.1},
}


def test_the_built_in_modes_are_registered():
    assert set(OPTIONS) <= set(mode_names())
    for name, cls in OPTIONS.items():
        assert vlsae_hooks.modes.mode_spec(name).options_cls is cls
    assert modes_taking("alpha") == ("shift", "contrast", "reference")
    assert modes_taking("strength") == ("evidence", "grounding", "lexical")


@pytest.mark.parametrize("cls", list(NUMBERS))
def test_numbers_out_of_range_wrong_typed_or_non_finite_are_refused_naming_the_field(cls):
    for name, bad in NUMBERS[cls].items():
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name} must "):
            cls(**{name: bad})
        for value in (math.nan, math.inf, -math.inf, "0.5", None, True):
            with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name} must be a finite "
                                                 "number"):
                cls(**{name: value})


def test_choices_and_sites_are_checked():
    with pytest.raises(ValueError, match=r"ShiftOptions\.image_source must be one of"):
        ShiftOptions(image_source="none")  # "none" is LexVLA's uniform evidence only
    assert LexicalOptions(image_source="none").image_source == "none"
    with pytest.raises(ValueError, match=r"LexicalOptions\.image_source must be one of"):
        LexicalOptions(image_source="mine")
    with pytest.raises(ValueError, match=r"ContrastOptions\.site must be 'input' or 'output'"):
        ContrastOptions(layer=1, site="middle")
    with pytest.raises(ValueError, match=r"EvidenceOptions\.site needs a layer"):
        EvidenceOptions(site="input")
    assert ContrastOptions(layer=1, site="output").site == "output"
    for layer in (1.5, True):  # True is an int to Python, not a layer
        with pytest.raises(ValueError, match=r"ShiftOptions\.layer must be an int"):
            ShiftOptions(layer=layer)
    for ids in (("yes",), "30", b"30", (3, True)):  # a string would be read as its digits' ids
        with pytest.raises(ValueError, match=r"EvidenceOptions\.affirm_token_ids must be token"):
            EvidenceOptions(affirm_token_ids=ids)
    for ids in ((30, 30), (torch.tensor(30), 30)):  # it would move twice as far
        with pytest.raises(ValueError, match="names a token twice"):
            EvidenceOptions(affirm_token_ids=ids)
    ids = EvidenceOptions(affirm_token_ids=[torch.tensor(3), 4]).affirm_token_ids
    assert ids == (3, 4) and [type(t) for t in ids] == [int, int]
    with pytest.raises(ValueError, match=r"EvidenceOptions\.affirm needs affirm_token_ids"):
        EvidenceOptions(affirm=1.0)
    assert EvidenceOptions().image_weight == 1.0 and ContrastOptions().image_weight == 0.9
    with pytest.raises(ValueError, match=r"GroundingOptions\.threshold must lie in \(0, 1\]"):
        GroundingOptions(threshold=0.0)
    with pytest.raises(ValueError, match=r"GroundingOptions\.image_source must be one of"):
        GroundingOptions(image_source="none")
    with pytest.raises(ValueError, match=r"GroundingOptions\.layer must be an int"):
        GroundingOptions(layer="0")
    with pytest.raises(ValueError, match=r"GroundingOptions\.readout must be a path or None"):
        GroundingOptions(readout=3)
    assert GroundingOptions(readout="folder").readout == "folder"
    assert (GroundingOptions().strength, GroundingOptions().threshold) == (4.0, 1.0)


def test_attach_refuses_an_option_of_another_mode_naming_its_modes(model, space):
    with pytest.raises(TypeError, match=r"alpha is an option of shift, contrast, reference; "
                                        r"mode 'evidence' takes: image_weight, image_source, "
                                        r"layer, site, strength, affirm"):
        attach(model, space, mode="evidence", alpha=0.3)
    with pytest.raises(TypeError, match=r"contrast_weight is an option of contrast, reference; "
                                        r"mode 'shift' takes"):
        attach(model, space, mode="shift", contrast_weight=0.9)
    with pytest.raises(TypeError, match=r"unknown steering options \['a'\]; mode 'contrast'"):
        attach(model, space, a=0.9)  # the old names are gone
    with pytest.raises(TypeError, match=r"^alpha is an option of shift, contrast, reference; "
                                        r"unknown steering options \['gamma'\]; mode 'evidence' "
                                        r"takes: image_weight, "):
        attach(model, space, mode="evidence", alpha=0.3, gamma=1)
    with pytest.raises(ValueError, match=r"ContrastOptions\.alpha must be a finite number"):
        attach(model, space, alpha=math.nan)
    with pytest.raises(ValueError, match="mode must be one of"):
        attach(model, space, mode="vcd")
    assert not getattr(model, "_vlsae_steering_handle", None)  # nothing stayed attached


def test_handle_options_is_the_modes_dataclass(model, space):
    for mode, cls in (("contrast", ContrastOptions), ("shift", ShiftOptions),
                      ("reference", ReferenceOptions)):
        with attach(model, space, mode=mode, alpha=0.5) as handle:
            assert type(handle.options) is cls and handle.mode == mode
            assert handle.options == cls(alpha=0.5)
            assert repr(handle.options) in repr(handle) and f"mode {mode!r}" in repr(handle)


@dataclass
class BoostOptions:
    """The toy mode's options."""

    token: int = 7
    """The token whose logit goes up."""
    amount: float = 1.0
    """By how much."""


class BoostSteerer(Steerer):
    """The toy mode: adds ``amount`` to one token's logit; a no-op at amount 0."""

    def __init__(self, model, space, options):
        self.model, self.space, self.options = model, space, options

    def no_op(self):
        return "boost by 0" if self.options.amount == 0 else None

    def hooks(self):
        def boost(module, args, output):
            output.logits[..., self.options.token] += self.options.amount
            return output
        return [self.model.register_forward_hook(boost)]


@pytest.fixture()
def toy_modes():
    """Registers modes for one test (``toy_modes(name, options_cls, steerer_cls)``) and takes
    them off the registry after it."""
    names = []

    def register(name, options_cls=BoostOptions, steerer_cls=BoostSteerer):
        names.append(name)
        return register_mode(name, options_cls, steerer_cls)

    yield register
    for name in names:
        _MODES.pop(name, None)


def test_a_registered_toy_mode_is_found_by_attach(model, space, toy_modes):
    batch = {**left_pad([llava_prompt([5, 6, 7])]), "pixel_values": torch.randn(1, 3, 32, 32)}
    toy_modes("boost")
    with torch.no_grad():
        plain = model(**batch).logits
        with attach(model, space, mode="boost", amount=2.5) as handle:
            boosted = model(**batch).logits
            assert handle.options == BoostOptions(amount=2.5) and handle.site_layer is None
            assert repr(handle) == ("SteeringHandle(attached, mode 'boost', "
                                    "BoostOptions(token=7, amount=2.5))")  # no site named
        with pytest.raises(TypeError, match="alpha is an option of .*; mode 'boost' takes: "
                                            "token, amount"):
            attach(model, space, mode="boost", alpha=1.0)
    torch.testing.assert_close(boosted[..., 7], plain[..., 7] + 2.5)
    torch.testing.assert_close(boosted[..., :7], plain[..., :7])
    _MODES.pop("boost")
    with pytest.raises(ValueError, match="mode must be one of"):
        attach(model, space, mode="boost")
    with pytest.raises(TypeError, match="must be a dataclass"):
        register_mode("plain", dict, BoostSteerer)


def test_registering_names_replaces_and_a_mode_without_options_says_so(model, space, toy_modes):
    for name in ("", None):
        with pytest.raises(ValueError, match="a mode name must be a non-empty string"):
            register_mode(name, BoostOptions, BoostSteerer)
    assert "" not in mode_names()

    @dataclass
    class NoOptions:
        pass

    toy_modes("toy")
    assert toy_modes("toy", NoOptions).options_cls is NoOptions  # registered again: replaced
    assert vlsae_hooks.modes.mode_spec("toy").options_cls is NoOptions
    with pytest.raises(TypeError, match=r"^alpha is an option of shift, contrast, reference; "
                                        r"mode 'toy' takes: no options$"):
        attach(model, space, mode="toy", alpha=1.0)


def test_a_no_op_warning_points_at_the_callers_line(model, space, toy_modes):
    toy_modes("boost")
    with pytest.warns(NoOpSteering, match="boost by 0: no hook is registered") as record:
        handle = attach(model, space, mode="boost", amount=0.0)
    handle.remove()
    assert [Path(r.filename) for r in record] == [Path(__file__)]


def test_a_mode_that_hooks_nothing_leaves_the_model_free_to_attach_again(model, space, toy_modes):
    class NothingSteerer(BoostSteerer):
        def register(self):
            return []

    toy_modes("nothing", BoostOptions, NothingSteerer)
    first = attach(model, space, mode="nothing")
    assert not first.attached and repr(first).startswith("SteeringHandle(removed, ")
    with attach(model, space, mode="shift") as second:  # nothing holds the model
        assert second.attached
    first.remove()
    assert not getattr(model, "_vlsae_steering_handle", None)
