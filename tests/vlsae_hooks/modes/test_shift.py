"""Shift mode against hand computation on a tiny LLaVA: the prefill's shift, a bf16 model's, a
cached decoding step's running text mean, and alpha 0."""

import copy

import torch

from vlsae_hooks import attach
from vlsae_hooks.pooling import prefill_masks
from vlsae_hooks.testing import IMAGE_TOKEN

torch.set_num_threads(1)
SITE = 2  # the random space says: input of decoder layer 2
IMAGE_IDS = torch.tensor([IMAGE_TOKEN])


def record_site(model, store: list):
    """Record the input of the steering layer (registered before attach: unshifted;
    after attach: what the layer really receives)."""
    return model.model.language_model.layers[SITE].register_forward_pre_hook(
        lambda module, args: store.append(args[0].detach().clone()))


def expected_shift(space, hidden, vision, text, alpha, image_weight):
    """The reference formulas with dense codes, one row at a time."""
    beta = image_weight
    out = hidden.clone()
    for row in range(hidden.shape[0]):
        v, t = hidden[row][vision[row]].mean(0), hidden[row][text[row]].mean(0)
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
    with attach(model, space, mode="shift", alpha=0.0):
        assert torch.equal(model(**batch).logits, plain)
    with attach(model, space, mode="contrast", alpha=2.0, contrast_weight=0.0,
                plausibility_cutoff=0.0):
        assert torch.equal(model(**batch).logits, plain)
