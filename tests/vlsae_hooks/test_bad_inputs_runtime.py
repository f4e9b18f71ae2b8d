"""The runtime under bad inputs and concurrent use: two threads generating on one attached
model, bad affirm ids, reference handles removed out of order, a NaN image, a model that
overflows."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.spaces import lexvla_space
from helpers.threads import run_concurrently

from vlsae_hooks import attach
from vlsae_hooks.handle import HANDLE_ATTR
from vlsae_hooks.testing import VOCAB, left_pad, llava_prompt, options_of, random_space, tiny_llava
from vlsae_hooks.uncached import UncachedGeneration
from vlsae_hooks.word_evidence import WordReadout

torch.set_num_threads(1)
# the steered logits alone decide
STRONG = dict(alpha=3.0, image_weight=1.0, contrast_weight=1.0, plausibility_cutoff=0.0)
TRIALS = 3


@pytest.fixture(scope="module")
def first_tokens(model) -> list[int]:
    """The first token plain decoding picks in each row of ``JOBS``: words to steer."""
    return torch.cat([generate(model, job)[:, -6] for job in JOBS]).tolist()


@pytest.fixture(scope="module")
def space(model, first_tokens):
    space = random_space(model, layer=2, n_concepts=64, k=4)
    g = torch.Generator().manual_seed(0)
    tokens = torch.tensor([*first_tokens, 11])
    space.word_readout = WordReadout(3 * torch.randn(64, 4, generator=g),
                                     torch.randn(4, generator=g) - 2, tokens,
                                     torch.full((4,), math.log(0.3)))
    return space


def batch(prompts: list[list[int]], seed: int) -> dict:
    pixels = torch.randn(len(prompts), 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return {**left_pad([llava_prompt(p) for p in prompts]), "pixel_values": pixels}


JOBS = [batch([[5, 6, 7, 8, 9], [9, 10]], seed=3), batch([[12, 13, 14]], seed=4)]
"""Two calls that differ in prompts, images, lengths and batch size."""

MODES = {"contrast": dict(mode="contrast", **STRONG),
         "shift": dict(mode="shift", **options_of("shift", STRONG)),
         "reference": dict(mode="reference", **STRONG),
         "evidence": dict(mode="evidence", strength=6.0, image_weight=0.5),
         "lexvla": dict(strength=6.0)}


def generate(model, inputs: dict) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize("name", sorted(MODES))
def test_concurrent_generate_equals_sequential_in_every_mode(model, space, first_tokens, name):
    plain = [generate(model, job) for job in JOBS]
    steering = lexvla_space(first_tokens) if name == "lexvla" else space
    with attach(model, steering, **MODES[name]):
        sequential = [generate(model, job) for job in JOBS]
        assert any(not torch.equal(s, p) for s, p in zip(sequential, plain))  # it steers
        for _ in range(TRIALS):
            concurrent = run_concurrently(lambda job: generate(model, job), JOBS)
            for got, expected in zip(concurrent, sequential):
                assert torch.equal(got, expected)
    assert all(torch.equal(generate(model, job), p) for job, p in zip(JOBS, plain))


@pytest.mark.parametrize("ids", [(-5,), (VOCAB + 3,), (4, -1)])
def test_out_of_vocabulary_affirm_ids_are_refused_at_attach(model, space, ids):
    bad = min(ids) if min(ids) < 0 else max(ids)
    with pytest.raises(ValueError, match=rf"affirm_token_ids names token id {bad}\b"):
        attach(model, space, mode="evidence", affirm=1.0, affirm_token_ids=ids)
    assert getattr(model, HANDLE_ATTR, None) is None


@pytest.mark.parametrize("user_value", [True, False])
@pytest.mark.parametrize("order", ["first_first", "last_first"])
def test_reference_guards_removed_in_any_order_restore_use_cache(model, order, user_value):
    model.generation_config.use_cache = user_value
    guards = [UncachedGeneration(model), UncachedGeneration(model)]
    guards[0 if order == "first_first" else 1].remove()
    assert model.generation_config.use_cache is False  # one guard still holds it
    for guard in guards:
        guard.remove()
    assert model.generation_config.use_cache is user_value
    model.generation_config.use_cache = True


def test_reference_handles_of_models_sharing_a_generation_config_restore_it(space):
    first, second = tiny_llava(), tiny_llava()
    second.generation_config = first.generation_config
    first.generation_config.use_cache = True
    handles = [attach(first, space, mode="reference"), attach(second, space, mode="reference")]
    for handle in handles:  # attach order, not the reverse
        handle.remove()
    assert first.generation_config.use_cache is True


@pytest.mark.parametrize("mode", ["contrast", "evidence"])
def test_a_nan_image_names_its_row_and_the_input(model, space, mode):
    inputs = batch([[5, 6, 7], [9, 10], [8]], seed=5)
    inputs["pixel_values"][1, 0, 3, 3] = float("nan")
    with attach(model, space, mode=mode):
        for call in (generate, lambda m, b: m(**b)):
            with pytest.raises(FloatingPointError, match=r"batch row\(s\) \[1\]") as error:
                call(model, inputs)
            assert "image input" in str(error.value) and "overflow" not in str(error.value)


def poisoned(model, fill):
    """A forward hook on decoder layer 1 (the site is layer 2's input) that writes nan/inf into
    its output with ``fill(hidden)``: the model overflowing."""

    def hook(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        fill(hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return model.model.language_model.layers[1].register_forward_hook(hook)


@pytest.mark.parametrize("mode", ["shift", "contrast"])
def test_one_infinite_text_element_is_found_and_blamed_on_the_text(model, space, mode):
    """fp16 overflows one feature, not a whole row: row 0's last text position gets inf in one
    element. It fails the call naming row 0's text (it was blamed on the image: 0 x inf in the
    image's masked sum)."""
    hook = poisoned(model, lambda hidden: hidden[0, -1, 3].fill_(float("inf")))
    try:
        with torch.no_grad(), attach(model, space, mode=mode, image_weight=0.7):
            with pytest.raises(FloatingPointError, match=r"batch row\(s\) \[0\]: non-finite "
                               r"\(nan/inf\) text positions") as error:
                model(**JOBS[0])
    finally:
        hook.remove()
    assert "overflowed" in str(error.value) and "image input" not in str(error.value)
