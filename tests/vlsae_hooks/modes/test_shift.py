"""Shift mode against hand computation on a tiny LLaVA: the prefill's shift (left and right
padding, the wrong-image control's), a bf16 model's, a cached decoding step's running text mean,
rows without an image left alone at every step, and alpha 0."""

import copy

import pytest
import torch
from transformers import DynamicCache

from vlsae_hooks import NoOpSteering, attach
from vlsae_hooks.pooling import prefill_masks
from vlsae_hooks.testing import BOS, IMAGE_TOKEN, PAD, left_pad, llava_prompt

torch.set_num_threads(1)
SITE = 2  # the random space says: input of decoder layer 2
IMAGE_IDS = torch.tensor([IMAGE_TOKEN])


def record_site(model, store: list):
    """Record the input of the steering layer (registered before attach: unshifted;
    after attach: what the layer really receives)."""
    return model.model.language_model.layers[SITE].register_forward_pre_hook(
        lambda module, args: store.append(args[0].detach().clone()))


def expected_shift(space, hidden, vision, text, alpha, image_weight, image_rows=None):
    """The reference formulas with dense codes, one row at a time; ``image_rows[i]``: the row
    whose image steers row i (None: its own)."""
    beta = image_weight
    out = hidden.clone()
    for row in range(hidden.shape[0]):
        source = row if image_rows is None else image_rows[row]
        v, t = hidden[source][vision[source]].mean(0), hidden[row][text[row]].mean(0)
        z = (1 - beta) * space.encode(t, "text") + beta * space.encode(v, "vision")
        t_new = (1 - alpha) * t + alpha * space.decode(z, "text")
        out[row][text[row]] += t_new - t
    return out


def test_shift_matches_hand_computation(model, space, batch):
    before, after = [], []
    recorder = record_site(model, before)
    with attach(model, space, mode="shift", alpha=0.5, image_weight=0.7):
        seen = record_site(model, after)
        model(**batch, use_cache=False)
        seen.remove()
    recorder.remove()
    vision, text = prefill_masks(batch["input_ids"], batch["attention_mask"], IMAGE_IDS)
    expected = expected_shift(space, before[0], vision, text, alpha=0.5, image_weight=0.7)
    torch.testing.assert_close(after[0], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(after[0][~text], before[0][~text])  # image, padding, pre-image untouched
    assert not torch.allclose(after[0][text], before[0][text])


def shifted_prefill(model, space, inputs: dict, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(the site's input without steering, with it) of one uncached forward under shift."""
    before, after = [], []
    recorder = record_site(model, before)
    with torch.no_grad(), attach(model, space, mode="shift", **options):
        seen = record_site(model, after)
        model(**inputs, use_cache=False)
        seen.remove()
    recorder.remove()
    return before[0], after[0]


def hand_masks(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The image positions and the tokens after the last one, written out (not the library's
    ``prefill_masks``, whose mistakes the expected values would otherwise share)."""
    vision = ids == IMAGE_TOKEN
    positions = torch.arange(ids.shape[1])
    last_image = torch.where(vision, positions, -1).max(1).values
    return vision, (positions > last_image[:, None]) & mask.bool()


def test_right_padding_is_neither_shifted_nor_counted(model, space, pixels):
    rows = [llava_prompt([5, 6, 7, 8, 9]), llava_prompt([9, 10]) + [PAD] * 3]
    ids = torch.tensor(rows)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    before, after = shifted_prefill(model, space, inputs, alpha=0.5, image_weight=0.7)
    vision, text = hand_masks(ids, mask)
    expected = expected_shift(space, before, vision, text, alpha=0.5, image_weight=0.7)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(after[1, -3:], before[1, -3:])


def test_the_wrong_image_control_shifts_by_exactly_the_next_rows_image(model, space, rows,
                                                                      pixels):
    """One prompt twice with two images: each row's text moves toward the other row's image
    code, values and concepts both (not its own concepts with the other's values)."""
    inputs = {**left_pad([rows[0], rows[0]]), "pixel_values": pixels}
    before, after = shifted_prefill(model, space, inputs, alpha=0.5, image_weight=0.7,
                                    image_source="other")
    vision, text = hand_masks(inputs["input_ids"], inputs["attention_mask"])
    expected = expected_shift(space, before, vision, text, alpha=0.5, image_weight=0.7,
                              image_rows=[1, 0])
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)


def decode_by_hand(model, inputs: dict, tokens: torch.Tensor, mask: bool) -> list[torch.Tensor]:
    """The last logits of a cached prefill and of one forward per column of ``tokens``, with
    the growing attention mask or none."""
    cache = DynamicCache(config=model.config)
    attention = inputs["attention_mask"]
    options = {"attention_mask": attention} if mask else {}
    logits = [model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                    cache=cache, **options).logits[:, -1]]
    for column in tokens.T:
        if mask:
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1)
            options = {"attention_mask": attention}
        logits.append(model(input_ids=column[:, None], cache=cache, **options).logits[:, -1])
    return logits


@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("mode", ["shift", "contrast"])
def test_a_row_without_an_image_is_left_alone_at_every_step(model, space, pixels, mode, mask):
    """A batch of an image prompt and a text-only prompt: the text-only row decodes exactly as
    without steering, prefill and steps, with or without an attention mask."""
    with_image = llava_prompt([5, 6, 7])
    text_only = [BOS, 3] + [10 + i % 20 for i in range(len(with_image) - 2)]
    inputs = {"input_ids": torch.tensor([with_image, text_only]),
              "attention_mask": torch.ones(2, len(with_image), dtype=torch.long),
              "pixel_values": pixels[:1]}
    tokens = torch.tensor([[11, 12, 13], [21, 22, 23]])
    with torch.no_grad():
        plain = decode_by_hand(model, inputs, tokens, mask)
        with attach(model, space, mode=mode, alpha=1.5):
            steered = decode_by_hand(model, inputs, tokens, mask)
    for plain_step, steered_step in zip(plain, steered):
        torch.testing.assert_close(steered_step[1], plain_step[1], atol=1e-6, rtol=0)
    assert not torch.allclose(steered[-1][0], plain[-1][0])


def test_a_bfloat16_model_is_shifted_by_its_float32_space(model, space, batch):
    """A bf16 model with the space kept in float32: the site's text positions move by the
    float32 shift of the bf16 states (to bf16 precision), the rest not at all."""
    half = copy.deepcopy(model).to(torch.bfloat16)
    before, after = [], []
    recorder = record_site(half, before)
    with torch.no_grad(), attach(half, space, mode="shift", alpha=0.5, image_weight=0.7):
        seen = record_site(half, after)
        half(**batch, use_cache=False)
        seen.remove()
    recorder.remove()
    assert after[0].dtype == torch.bfloat16
    vision, text = prefill_masks(batch["input_ids"], batch["attention_mask"], IMAGE_IDS)
    plain = before[0].float()
    want = (expected_shift(space, plain, vision, text, alpha=0.5, image_weight=0.7) - plain)[text]
    moved = after[0].float()[text] - plain[text]
    # the shift and the moved state are each rounded to bf16 (2^-9 relative, twice that here)
    bound = (after[0].float()[text].abs() + want.abs()) * 2**-8 + 1e-6
    assert ((moved - want).abs() <= bound).all()
    assert abs((moved * want).sum() / (want * want).sum() - 1) < 0.01  # alpha applied once
    assert torch.equal(after[0][~text], before[0][~text])


def test_cached_decode_step_uses_running_text_mean(model, space, batch):
    """One decode step: the new position is shifted with the mean over prompt text + itself."""
    before, after = [], []
    recorder = record_site(model, before)
    with attach(model, space, mode="shift", alpha=0.5, image_weight=0.7):
        seen = record_site(model, after)
        model.generate(**batch, max_new_tokens=2, do_sample=False)
        seen.remove()
    recorder.remove()
    vision, text = prefill_masks(batch["input_ids"], batch["attention_mask"], IMAGE_IDS)
    prefill, step = before[0], before[1]
    for row in range(2):
        v = prefill[row][vision[row]].mean(0)
        t = torch.cat([prefill[row][text[row]], step[row]]).mean(0)
        z = 0.3 * space.encode(t, "text") + 0.7 * space.encode(v, "vision")
        shift = 0.5 * (space.decode(z, "text") - t)
        torch.testing.assert_close(after[1][row, 0], step[row, 0] + shift, atol=1e-5, rtol=1e-5)


def test_cache_on_equals_cache_off_for_the_first_step(model, space, batch):
    kw = dict(max_new_tokens=1, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with attach(model, space, mode="shift", alpha=1.5):
        cached = model.generate(**batch, use_cache=True, **kw).logits[0]
        uncached = model.generate(**batch, use_cache=False, **kw).logits[0]
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)


def test_zero_strength_is_identity(model, space, batch):
    plain = model(**batch).logits
    with pytest.warns(NoOpSteering, match="mode shift with alpha = 0 moves no state"):
        handle = attach(model, space, mode="shift", alpha=0.0)
    with handle:
        assert torch.equal(model(**batch).logits, plain)
    with pytest.warns(NoOpSteering, match="keeps the plain logits"):
        handle = attach(model, space, mode="contrast", alpha=2.0, contrast_weight=0.0,
                        plausibility_cutoff=0.0)
    with handle:
        assert torch.equal(model(**batch).logits, plain)


def test_the_state_keeps_the_images_decoded_part_and_it_follows_the_cache(model, space, batch):
    """The prefill decodes the image's part of the mixed code, D_t(w z_v), once per row into
    the sequence's state; a reorder or batch selection of the cache moves it with its row (a
    selected row goes on with its own image's part)."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), attach(model, space, mode="shift", alpha=0.5, image_weight=0.7):
        model(**batch, cache=cache)
    state = cache.layers[-1]
    term = state.image_term
    assert term.shape == (2, 1, 64) and not torch.allclose(term[0], term[1])
    decoded = space.decode_sparse(0.7 * state.vision_values, state.vision_indices, "text")
    torch.testing.assert_close(term[:, 0], decoded, atol=1e-5, rtol=1e-5)
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(state.image_term, term[[1, 0]])
    cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(state.image_term, term[[0]])
