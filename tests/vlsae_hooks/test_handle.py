"""The handle ``attach`` returns: what its repr says, and removing a stale handle again never
detaches the model's live one."""

import pytest
import torch
from helpers.spaces import lexvla_space

from vlsae_hooks import attach
from vlsae_hooks.handle import HANDLE_ATTR

torch.set_num_threads(1)


def test_repr_says_attached_or_removed_the_mode_and_the_site(model, space):
    handle = attach(model, space, alpha=0.5)
    handle.remove()
    rest = ("mode 'contrast', input of decoder layer 2, ContrastOptions(image_weight=0.9, "
            "image_source='own', layer=None, site=None, alpha=0.5, contrast_weight=0.6, "
            "plausibility_cutoff=0.8))")
    assert repr(handle) == f"SteeringHandle(removed, {rest}"
    with attach(model, space, alpha=0.5) as handle:
        assert repr(handle) == f"SteeringHandle(attached, {rest}"


def test_removing_a_removed_handle_leaves_the_live_one_attached(model, space):
    first = attach(model, space)
    first.remove()
    with attach(model, space, mode="shift") as second:
        first.remove()  # again, while another handle holds the model
        assert getattr(model, HANDLE_ATTR) is second and second.attached
        with pytest.raises(RuntimeError, match="already attached"):
            attach(model, space)
    assert getattr(model, HANDLE_ATTR, None) is None


def test_repr_names_decoder_layer_0_and_no_layer_for_a_mode_that_steers_none(model, space):
    with pytest.warns(UserWarning, match="input of decoder layer 0"):
        handle = attach(model, space, layer=0, site="input")
    with handle:
        assert repr(handle).startswith("SteeringHandle(attached, mode 'contrast', input of "
                                       "decoder layer 0, ContrastOptions(")
    lexical = lexvla_space([10, 20, 30])
    with attach(model, lexical) as handle:
        assert handle.site_layer is None
        assert repr(handle).startswith("SteeringHandle(attached, mode 'lexical', "
                                       "LexicalOptions(")
