"""mode="reference" equals the reference's uncached two-pass loop, written out here by hand."""

import pytest
import torch
from transformers import DynamicCache

from vlsae_hooks import attach
from vlsae_hooks.testing import IMAGE_TOKEN, llava_prompt

torch.set_num_threads(1)
SITE = 2
# the reference's POPE settings
SETTINGS = dict(alpha=0.8, image_weight=0.9, contrast_weight=0.6, plausibility_cutoff=0.8)
N_TOKENS = 8


@pytest.fixture(scope="module", params=[[5, 6, 7, 8, 9], [9, 10]], ids=["long", "short"])
def prompt(request):
    torch.manual_seed(3)
    return {"input_ids": torch.tensor([llava_prompt(request.param)]),
            "pixel_values": torch.randn(1, 3, 32, 32)}


def full_pass(model, ids, pixels, site_hook=None):
    """Last-position logits of one uncached forward over the whole sequence."""
    layer = model.model.language_model.layers[SITE]
    handle = layer.register_forward_pre_hook(site_hook) if site_hook else None
    try:
        with torch.no_grad():
            return model(input_ids=ids, pixel_values=pixels, use_cache=False).logits[0, -1]
    finally:
        if handle:
            handle.remove()


def reference_loop(model, space, prompt, alpha, image_weight, contrast_weight,
                   plausibility_cutoff):
    """The reference, step by step: recompute everything, plain pass, steered pass, contrast.

    Returns the generated ids and how many tokens the plausibility cut kept at each step.
    """
    beta, a, b = image_weight, contrast_weight, plausibility_cutoff
    ids, pixels, kept = prompt["input_ids"], prompt["pixel_values"], []
    for _ in range(N_TOKENS):
        # full_pass removes its hook before it returns: each hook below runs in its own iteration
        seen = {}
        plain = full_pass(model, ids, pixels,
                          lambda m, args: seen.update(h=args[0][0].clone()))  # noqa: B023
        hidden = seen["h"]
        is_image = ids[0] == IMAGE_TOKEN
        after_image = torch.arange(len(ids[0])) > is_image.nonzero().max()
        v, t = hidden[is_image].mean(0), hidden[after_image].mean(0)
        z = (1 - beta) * space.encode(t, "text") + beta * space.encode(v, "vision")
        shift = alpha * (space.decode(z, "text") - t)  # t' - t with t' = (1-alpha) t + alpha t~

        def steer(module, args):
            shifted = args[0].clone()
            shifted[0, after_image] += shift  # noqa: B023
            return (shifted, *args[1:])

        steered = full_pass(model, ids, pixels, steer)
        probs = plain.softmax(-1)
        keep = probs >= b * probs.max()
        mixed = torch.where(keep, (1 - a) * plain + a * steered, -torch.inf)
        token = (mixed if keep.any() else plain).argmax()
        kept.append(int(keep.sum()))
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return ids[0, -N_TOKENS:], kept


def greedy(model, prompt, **kwargs):
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=N_TOKENS, min_new_tokens=N_TOKENS,
                             do_sample=False, **kwargs)
    return out[0, -N_TOKENS:]


def test_reference_mode_equals_the_uncached_two_pass_loop(model, space, prompt):
    expected, kept = reference_loop(model, space, prompt, **SETTINGS)
    vocab = model.config.text_config.vocab_size
    assert any(1 < n < vocab for n in kept)  # the plausibility cut both kept and dropped tokens
    with attach(model, space, mode="reference", **SETTINGS):
        assert torch.equal(greedy(model, prompt), expected)


def test_contrast_mode_without_cache_is_the_same_computation(model, space, prompt):
    """The claim in vlsae_hooks.modes.contrast: generate(use_cache=False) under contrast mode
    reproduces the reference."""
    expected, _ = reference_loop(model, space, prompt, **SETTINGS)
    with attach(model, space, mode="contrast", **SETTINGS):
        assert torch.equal(greedy(model, prompt, use_cache=False), expected)


def test_reference_mode_changes_greedy_output_where_the_formula_does(model, space, prompt):
    plain = greedy(model, prompt)
    strong = dict(alpha=3.0, image_weight=1.0, contrast_weight=1.0, plausibility_cutoff=0.0)
    expected, _ = reference_loop(model, space, prompt, **strong)
    assert not torch.equal(expected, plain)  # the formula moves the argmax ...
    with attach(model, space, mode="reference", **strong):
        assert torch.equal(greedy(model, prompt), expected)  # ... and so does the mode
    assert torch.equal(greedy(model, prompt), plain)


@pytest.mark.parametrize("decoding", [dict(do_sample=True, top_k=0), dict(num_beams=3)],
                         ids=["sampling", "beam"])
def test_reference_mode_acts_under_sampling_and_beam(model, space, prompt, decoding):
    def run():
        torch.manual_seed(0)
        with torch.no_grad():
            return model.generate(**prompt, max_new_tokens=6, output_scores=True,
                                  return_dict_in_generate=True, **decoding)

    plain = run()
    with attach(model, space, mode="reference", alpha=3.0, image_weight=1.0, contrast_weight=1.0,
                plausibility_cutoff=0.0):
        steered = run()
    assert not torch.equal(plain.scores[0], steered.scores[0])


def test_cached_contrast_differs_after_the_first_step(model, space, prompt):
    """Past positions keep their old shift under the cache; the reference re-shifts them."""
    def scores(mode):
        with attach(model, space, mode=mode, **SETTINGS), torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        return out.sequences, out.logits

    cached_ids, cached = scores("contrast")
    reference_ids, reference = scores("reference")
    torch.testing.assert_close(cached[0], reference[0])  # the first step sees the same states
    assert (not torch.equal(cached_ids, reference_ids)
            or not torch.allclose(cached[-1], reference[-1]))


def test_use_cache_is_restored_and_a_reused_cache_is_refused(model, space, prompt):
    before = model.generation_config.use_cache
    with attach(model, space, mode="reference"):
        assert model.generation_config.use_cache is False
        with pytest.raises(ValueError, match="recomputes the whole sequence every step"):
            model.generate(**prompt, max_new_tokens=3, use_cache=True)
    assert model.generation_config.use_cache == before
    assert not model._forward_pre_hooks


def test_only_a_cache_that_holds_tokens_is_refused(model, space, prompt):
    """One full forward given an empty cache is the reference's computation; a cache holding
    even one token would skip its positions."""
    ids = prompt["input_ids"]
    one_token = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids[:, :1], cache=one_token, use_cache=True)
        with attach(model, space, mode="reference"):
            uncached = model(**prompt, use_cache=False).logits
            empty = model(**prompt, cache=DynamicCache(), use_cache=True).logits
            with pytest.raises(ValueError, match="this call reuses a KV cache"):
                model(input_ids=ids[:, 1:], pixel_values=prompt["pixel_values"],
                      cache=one_token, use_cache=True)
    assert torch.equal(empty, uncached)
