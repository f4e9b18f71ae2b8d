"""VISTA: the null prompt, its steering vectors and exact step on a tiny random LLaVA, batched
decoding equal to one prompt at a time, and its wrong-image control."""

import pytest
import torch
from helpers.peers import layer0_outputs

from eval_suites.peers.vista import VisualSteering, null_prompt
from eval_suites.peers.vti import last_token_states, rotate_towards
from vlsae_hooks.testing import IMAGE_TOKEN, PAD, left_pad, llava_prompt


def test_null_prompt_drops_image_tokens_and_padding():
    batch = left_pad([llava_prompt([5, 6], n_image_tokens=3), llava_prompt([7], n_image_tokens=3)])
    got = null_prompt(batch["input_ids"], batch["attention_mask"], (IMAGE_TOKEN,), PAD)
    assert got["input_ids"].tolist() == [[1, 3, 5, 6], [0, 1, 3, 7]]
    assert got["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert got["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]


def vista_reference(model, inputs, row):
    """One prompt alone: last-token layer outputs with the image minus its text-only prompt."""
    ids = inputs["input_ids"][row][inputs["attention_mask"][row] == 1][None]
    with_image = last_token_states(
        model, input_ids=ids, pixel_values=inputs["pixel_values"][row : row + 1]
    )
    text_only = last_token_states(model, input_ids=ids[ids != IMAGE_TOKEN][None])
    return (with_image - text_only)[0]


def test_vista_vectors_and_exact_step(tiny):
    model, inputs = tiny
    plain_mlp, plain_out = layer0_outputs(model, inputs)
    with torch.no_grad():
        plain_logits = model(**inputs).logits
    with VisualSteering(model, lam=0.1) as vista:
        mlp, out = layer0_outputs(model, inputs)
        vectors = vista.vectors
    assert vectors.shape == (3, 4, 64)
    for row in range(3):
        assert torch.allclose(vectors[row], vista_reference(model, inputs, row), atol=1e-4)
    step = rotate_towards(plain_mlp, vectors[:, 0, None], 0.1, boost=True)
    assert torch.equal(mlp, step)
    assert torch.allclose(out, plain_out + (step - plain_mlp), atol=1e-6)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain_logits)
    assert not model._forward_pre_hooks
    assert all(not layer.mlp._forward_hooks for layer in model.model.language_model.layers)


def test_vista_batched_generate_equals_one_prompt_at_a_time(tiny):
    model, inputs = tiny
    with VisualSteering(model, lam=0.5) as vista:
        batched = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        batched_vectors = vista.vectors
        width = inputs["input_ids"].shape[1]
        for row in range(3):
            mask = inputs["attention_mask"][row] == 1
            alone = model.generate(
                input_ids=inputs["input_ids"][row][mask][None],
                pixel_values=inputs["pixel_values"][row : row + 1],
                max_new_tokens=5,
                do_sample=False,
            )
            assert torch.equal(alone[0, int(mask.sum()) :], batched[row, width:])
            assert torch.allclose(vista.vectors[0], batched_vectors[row], atol=1e-4)
    plain = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert not torch.equal(plain, batched)  # lambda 0.5 changes the tiny model's greedy output


def test_vista_wrong_image_control_steers_with_another_images_vector(tiny):
    model, inputs = tiny
    with VisualSteering(model) as own, torch.no_grad():
        model(**inputs)
        mine = own.vectors
    with VisualSteering(model, image_source="other") as wrong, torch.no_grad():
        model(**inputs)
        assert torch.equal(wrong.vectors, mine.roll(-1, dims=0))  # the next row's image
        one = {k: v[:1] for k, v in inputs.items()}  # its own image is no control
        with pytest.raises(ValueError, match="at least two different images"):
            model(**one)
    with pytest.raises(ValueError, match="'own' or 'other'"):
        VisualSteering(model, image_source="neighbour")


def test_vista_wrong_image_control_never_takes_a_beam_of_its_own_prompt(tiny):
    """Rows [A, A, B, B] (two beams per prompt, as generate expands them): each row is steered
    with a row of the other image; the old neighbour roll steered row 1 with row 0's A."""
    model, inputs = tiny
    beams = {k: v[:2].repeat_interleave(2, dim=0) for k, v in inputs.items()}
    with VisualSteering(model) as own, torch.no_grad():
        model(**beams)
        mine = own.vectors
    with VisualSteering(model, image_source="other") as wrong, torch.no_grad():
        model(**beams)
        assert torch.equal(wrong.vectors, mine[[2, 2, 0, 0]])
    two = {k: v[:2] for k, v in inputs.items()}
    seen = {}
    for source in ("own", "other"):  # generate encodes the images once, then expands the rows
        with VisualSteering(model, image_source=source) as vista, torch.no_grad():
            model.generate(**two, max_new_tokens=1, num_beams=2, do_sample=False)
            seen[source] = vista.vectors
    assert not torch.equal(seen["own"][0], seen["own"][2])
    assert torch.equal(seen["other"], seen["own"][[2, 2, 0, 0]])
