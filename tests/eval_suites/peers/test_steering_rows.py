"""VISTA's rules for the rows of a batch: a left-padded batch only, and the wrong-image control
never takes a text-only row's vector nor gives a text-only row another's."""

import pytest
import torch
from helpers.peers import TEXTS

from eval_suites.peers.vista import VisualSteering
from vlsae_hooks.testing import left_pad, llava_prompt


def test_vista_refuses_a_right_padded_batch(tiny):
    model, inputs = tiny
    right = {**inputs, "attention_mask": inputs["attention_mask"].flip(-1)}  # a row ends padded
    with VisualSteering(model), torch.no_grad(), pytest.raises(ValueError, match="on the left"):
        model(**right)


def test_vista_wrong_image_control_leaves_a_text_only_row_its_own_vector(tiny):
    model, inputs = tiny
    batch = left_pad([llava_prompt(TEXTS[0]), llava_prompt(TEXTS[1], n_image_tokens=0),
                      llava_prompt(TEXTS[2])])
    batch["pixel_values"] = inputs["pixel_values"][[0, 2]]  # images of rows 0 and 2 only
    vectors = {}
    for source in ("own", "other"):
        with VisualSteering(model, image_source=source) as vista, torch.no_grad():
            model(**batch)
            vectors[source] = vista.vectors
    assert torch.equal(vectors["other"], vectors["own"][[2, 1, 0]])
