"""Where a layer-site mode steers (``resolve_site``), whether the space fits the model
(``check_space_fits``) and the space placed on the steered layer's device (``placed_space``),
beyond what ``test_attach`` goes through: the edges of the layer range, a space trained at a
layer's output, the warnings' wording, count and place, and readouts left on another device."""

import warnings

import pytest
import torch
from helpers.spaces import small_space

from vlsae_hooks import attach
from vlsae_hooks.site import placed_space
from vlsae_hooks.testing import random_space
from vlsae_hooks.word_evidence import WordReadout

torch.set_num_threads(1)
MODES = ["contrast", "shift", "reference"]  # every mode that steers where resolve_site says


def quietly(model, space, **options) -> int:
    """The site ``attach`` picks, failing on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with attach(model, space, **options) as handle:
            return handle.site_layer


def test_the_first_and_last_layers_of_the_range(model, space):  # 4 decoder layers
    with pytest.warns(UserWarning, match="input of decoder layer 0, but the space was trained "
                                         "at the input of layer 2$"):
        with attach(model, space, layer=0, site="input") as handle:
            assert handle.site_layer == 0
    with pytest.warns(UserWarning, match="input of decoder layer 0, but"):
        attach(model, space, layer=-4, site="input").remove()
    for layer in (4, -5):
        with pytest.raises(ValueError, match=f"^layer {layer} out of range for 4 decoder layers$"):
            attach(model, space, layer=layer, site="input")


def test_a_space_trained_at_a_layers_output_steers_the_next_layers_input(model):
    output_space = random_space(model, layer=1, site="layer_output")
    assert quietly(model, output_space) == 2
    assert quietly(model, output_space, layer=1) == 2  # the output of layer 1, as trained
    with pytest.warns(UserWarning, match="input of decoder layer 1, but the space was trained "
                                         "at the input of layer 2$"):
        attach(model, output_space, layer=1, site="input").remove()


def test_a_space_trained_on_no_decoder_layer_is_refused(model):
    projector = random_space(model, layer=None, site="projector_output")
    with pytest.raises(ValueError, match="trained on 'projector_output', not on decoder-layer "
                                         "states; decode-time steering needs a layer_input"):
        attach(model, projector)


def test_only_the_reference_warning_says_the_reference_steers_later(model, space):
    reference = random_space(model, layer=2)
    reference.config.source = "reference"
    for own, says in ((space, False), (reference, True)):
        with pytest.warns(UserWarning) as record:
            attach(model, own, layer=0, site="input").remove()
        (message,) = [str(w.message) for w in record]
        assert message.endswith("(the reference steers one layer later)") is says


@pytest.mark.parametrize("mode", MODES)
def test_the_warnings_point_at_the_line_that_called_attach(model, mode, monkeypatch):
    """Each mode's steerer classes nest differently (contrast's subclasses shift's): the
    warnings name the caller's line whichever mode led to them."""
    monkeypatch.setattr(model.config, "_name_or_path", "org/my-llava")
    own, other_type, other_name = (random_space(model, layer=2) for _ in range(3))
    other_type.config.model_type = "qwen2_5_vl"
    other_name.config.model_name = "org/another-llava"
    for space, options in ((own, dict(layer=0, site="input")), (other_type, {}),
                           (other_name, {})):
        with pytest.warns(UserWarning) as record:
            attach(model, space, mode=mode, **options).remove()
        assert [w.filename for w in record] == [__file__]


def test_a_space_for_another_model_type_warns_once_even_when_the_names_differ(model,
                                                                               monkeypatch):
    monkeypatch.setattr(model.config, "_name_or_path", "org/my-llava")
    other = random_space(model, layer=2)
    other.config.model_type, other.config.model_name = "qwen2_5_vl", "org/a-qwen"
    with pytest.warns(UserWarning) as record:
        attach(model, other).remove()
    assert [str(w.message) for w in record] == [
        "the concept space was trained for a 'qwen2_5_vl' model ('org/a-qwen'), this is a "
        "'llava' model"]


def test_a_model_loaded_from_a_local_copy_of_the_spaces_model_is_not_warned_about(model, space,
                                                                                  monkeypatch):
    """The names are compared by their last part: ``/models/llava-1.5-7b-hf`` is the model a
    space trained for ``llava-hf/llava-1.5-7b-hf`` was made for."""
    monkeypatch.setattr(model.config, "_name_or_path", "/models/llava-1.5-7b-hf")
    named = random_space(model, layer=2)
    named.config.model_name = "llava-hf/llava-1.5-7b-hf"
    assert quietly(model, named) == 2
    named.config.model_name = "llava-hf/llava-1.5-13b-hf"
    with pytest.warns(UserWarning, match=r"loaded as \['/models/llava-1.5-7b-hf'\]"):
        attach(model, named).remove()


def test_a_readout_left_on_another_device_is_copied_with_the_space():
    space = small_space().eval().to("meta")
    readout = WordReadout(torch.randn(8, 3), torch.zeros(3), torch.arange(3), torch.zeros(3))
    space.word_readout = readout  # set after the move: still on the CPU
    placed = placed_space(space, torch.device("meta"))
    assert placed is not space and placed.word_readout.weight.is_meta
    assert space.word_readout is readout and readout.weight.device.type == "cpu"
