"""The protocols' method names (``eval_suites.reproduce.methods``): each steered one attaches
its own mode with the options given, ``vlsae`` the one its space recommends, and the steering
comes off when the run ends."""

import pytest

from eval_suites.core.decoder import HFDecoder
from eval_suites.reproduce.methods import open_method
from vlsae_hooks.testing import random_space


@pytest.fixture
def steerable(toy_llava):
    """A decoder on the toy LLaVA and a space (layer 1) recommending shift at alpha 0.3."""
    model, processor = toy_llava
    space = random_space(model, layer=1)
    space.recommended_steering = {"mode": "shift", "alpha": 0.3}
    return HFDecoder(model, processor), space


def test_each_method_attaches_its_mode(steerable):
    """The recommended alpha goes with the recommended mode only; others take their
    default (0.8)."""
    decoder, space = steerable
    for method, mode, alpha in (("vlsae", "shift", 0.3), ("vlsae-shift", "shift", 0.3),
                                ("vlsae-contrast", "contrast", 0.8),
                                ("vlsae-reference", "reference", 0.8)):
        with open_method(decoder, method, space) as handle:
            assert (handle.mode, handle.site_layer, handle.options.alpha) == (mode, 1, alpha)
        assert not handle.attached
    with open_method(decoder, "vlsae-shift", space, alpha=0.25) as handle:
        assert handle.options.alpha == 0.25
    for method in ("regular", "greedy", "sample"):
        with open_method(decoder, method, space) as handle:
            assert handle is None


def test_readout_methods_ask_for_their_own_readout(steerable):
    decoder, space = steerable
    for method, mode in (("vlsae-evidence", "evidence"), ("vlsae-grounding", "grounding")):
        with pytest.raises(ValueError, match=rf"^mode='{mode}' needs a"):
            open_method(decoder, method, space).__enter__()


def test_an_unknown_method_is_refused(steerable):
    decoder, space = steerable
    with pytest.raises(ValueError, match=r"^unknown method 'vlsae-x'; choose one of \['greedy'"):
        open_method(decoder, "vlsae-x", space).__enter__()
