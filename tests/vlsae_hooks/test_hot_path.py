"""The decoding step's hot path: options that change nothing hook nothing; a step reads nothing
back from the device while its forward runs (its checks run at its start); what a step adds to
the cached state (in place, one position at a time) and what evidence mode keeps from the
prefill are the same numbers as before; evidence mode's per-call state keeps concurrent calls
apart."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings

import pytest
import torch
from helpers.host_reads import reads_inside_forwards
from helpers.spaces import lexvla_space, space_with_readouts
from helpers.threads import run_concurrently
from torch import nn
from transformers import DynamicCache

from vlsae_hooks import attach
from vlsae_hooks.cache_state import SteeringState
from vlsae_hooks.forward_call import ForwardCall
from vlsae_hooks.handle import HANDLE_ATTR
from vlsae_hooks.modes import ShiftOptions, ShiftSteerer
from vlsae_hooks.modes.contrast import ContrastOptions, ContrastSteerer
from vlsae_hooks.modes.evidence import EvidenceState, _EvidenceForward
from vlsae_hooks.modes.registry import NoOpSteering
from vlsae_hooks.modes.shift import RealignState, shifted_states
from vlsae_hooks.pooling import masked_sum
from vlsae_hooks.realignment import Realigner, contrast_logits
from vlsae_hooks.testing import IMAGE_TOKEN, left_pad, llava_prompt, tiny_llava

torch.set_num_threads(1)
SITE = 2


@pytest.fixture(scope="module")
def hot_model():
    return tiny_llava()


@pytest.fixture(scope="module")
def hot_space(hot_model):
    """A random space at the input of decoder layer 2, with a max-pooled word readout and a
    phrase readout over tokens the tiny model emits."""
    return space_with_readouts(hot_model, layer=SITE)


def batch(prompts: list[list[int]], seed: int) -> dict:
    pixels = torch.randn(len(prompts), 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return {**left_pad([llava_prompt(p) for p in prompts]), "pixel_values": pixels}


JOBS = [batch([[5, 6, 7, 8, 9], [9, 10], [11, 6]], seed=3), batch([[12, 13, 14]], seed=4)]
"""Calls that differ in prompts, images, lengths and batch size."""


def generate(model, inputs: dict, **kwargs):
    return model.generate(**inputs, max_new_tokens=6, do_sample=False,
                          return_dict_in_generate=True, output_logits=True, **kwargs)


def same_output(a, b) -> bool:
    return torch.equal(a.sequences, b.sequences) and all(
        torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True))


def hooks_of(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


NO_OPS = {"evidence": dict(mode="evidence", strength=0.0, affirm=0.0, phrase_strength=0.0,
                           affirm_token_ids=(8,)),
          "shift": dict(mode="shift", alpha=0.0),
          "contrast": dict(mode="contrast", alpha=2.0, contrast_weight=0.0,
                           plausibility_cutoff=0.0),
          "lexical": dict(strength=0.0)}


@pytest.mark.parametrize("name", sorted(NO_OPS))
def test_options_that_change_nothing_hook_nothing_and_say_so(hot_model, hot_space, name):
    space = lexvla_space([10, 20, 30]) if name == "lexical" else hot_space
    plain = generate(hot_model, JOBS[0])
    before = hooks_of(hot_model)
    with pytest.warns(NoOpSteering, match="no hook is registered, and the model decodes exactly "
                                          "as without attach"):
        handle = attach(hot_model, space, **NO_OPS[name])
    try:
        assert handle.attached and hooks_of(hot_model) == before
        assert same_output(generate(hot_model, JOBS[0]), plain)
        with pytest.raises(RuntimeError, match="already attached"):
            attach(hot_model, space, **NO_OPS[name])
    finally:
        handle.remove()
    assert not handle.attached and getattr(hot_model, HANDLE_ATTR, None) is None
    assert hooks_of(hot_model) == before and same_output(generate(hot_model, JOBS[0]), plain)


def test_reference_mode_is_never_a_no_op(hot_model, hot_space):
    """It reproduces the reference's uncached computation, whatever its weights: hooked and
    uncached, with no no-op warning, and its steered branch runs (the upper layers see 2B
    rows) although it weighs nothing."""
    rows = []
    last = hot_model.model.language_model.layers[-1]
    seen = last.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", NoOpSteering)
            with attach(hot_model, hot_space, mode="reference", contrast_weight=0.0,
                        plausibility_cutoff=0.0), torch.no_grad():
                assert hot_model.generation_config.use_cache is False
                assert hot_model._forward_pre_hooks and hot_model._forward_hooks
                hot_model(**JOBS[0])
    finally:
        seen.remove()
    assert rows == [2 * len(JOBS[0]["input_ids"])]


@pytest.mark.parametrize("steerer, options", [
    (ShiftSteerer, ShiftOptions(alpha=0.0)),
    (ContrastSteerer, ContrastOptions(alpha=2.0, contrast_weight=0.0, plausibility_cutoff=0.0))])
def test_the_hooks_of_a_no_op_change_no_logit_either(hot_model, hot_space, steerer, options):
    """What ``register`` skips would have changed nothing: the same options, hooked anyway."""
    inputs = JOBS[0]
    with torch.no_grad():
        plain = hot_model(**inputs).logits
        hooks = steerer(hot_model, hot_space, options).hooks()
        try:
            assert torch.equal(hot_model(**inputs).logits, plain)
        finally:
            for hook in hooks:
                hook.remove()
    # the shift a step would apply at alpha 0: the states come back bit for bit
    values, indices = hot_space.encode_sparse(torch.randn(2, 64), "vision")
    realigner = Realigner(hot_space, alpha=0.0, image_weight=0.9)
    state = RealignState(values, indices, 3 * torch.randn(2, 64), torch.full((2,), 3),
                         torch.ones(2, dtype=torch.bool),
                         image_term=realigner.image_term(values, indices))
    hidden = torch.randn(2, 5, 64)
    assert realigner.offset(values, indices, state.image_term, state.text_mean()).abs().max() > 0.1
    assert torch.equal(shifted_states(realigner, state, hidden, torch.ones(2, 5, dtype=torch.bool)),
                       hidden)
    assert torch.equal(contrast_logits(plain, torch.randn_like(plain), 0.0, 0.0), plain)


@pytest.mark.parametrize("options", [dict(mode="contrast"), dict(mode="shift"),
                                     dict(mode="evidence", strength=5.0, phrase_strength=1.0,
                                          affirm=1.0, affirm_token_ids=(8,)),
                                     dict(mode="evidence", image_weight=0.5)])
def test_a_decoding_step_reads_nothing_back_while_its_forward_runs(hot_model, hot_space, options):
    """Inside the forwards, steering reads from the device at the prefill (the image's and
    the prompt's checks) and never at a decoding step: 6 tokens add the reads of 1."""
    plain = {n: reads_inside_forwards(hot_model, JOBS[1], n) for n in (1, 6)}
    with attach(hot_model, hot_space, **options):
        steered = {n: reads_inside_forwards(hot_model, JOBS[1], n) for n in (1, 6)}
    prefill = steered[1] - plain[1]
    assert prefill > 0  # the prefill's checks
    assert steered[6] - plain[6] == prefill  # and nothing in the 5 decoding steps


def poison_from(model, layer: int, call: int):
    """Make decoder layer ``layer`` output nan from its ``call``-th forward on (0: the prefill)."""
    seen = [0]

    def hook(module, args, output):
        seen[0] += 1
        if seen[0] > call:
            hidden = output[0] if isinstance(output, tuple) else output
            return hidden * float("nan") if not isinstance(output, tuple) else (
                hidden * float("nan"), *output[1:])
        return None
    return model.model.language_model.layers[layer].register_forward_hook(hook)


@pytest.mark.parametrize("mode", ["contrast", "shift"])
def test_a_decoding_step_that_overflows_fails_at_the_next_step(hot_model, hot_space, mode):
    """The running text sums are checked at the start of the next step: a step whose states
    turn nan fails the call there, blaming the model, not the image."""
    poison = poison_from(hot_model, SITE - 1, call=2)  # the prefill and one step are fine
    try:
        with attach(hot_model, hot_space, mode=mode):
            with pytest.raises(FloatingPointError, match=r"batch row\(s\) \[0\]: non-finite "
                                                         r"\(nan/inf\) text positions.*overflowed"):
                hot_model.generate(**JOBS[1], max_new_tokens=5, do_sample=False)
    finally:
        poison.remove()


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_an_image_after_the_prefill_is_refused_before_the_step_runs(hot_model, hot_space,
                                                                    keyword):
    """Under either keyword the cache is found, so the second call is a step (transformers 5.25
    deprecates ``past_key_values``; callers may pass it until 5.40 removes it)."""
    inputs = JOBS[1]
    with (attach(hot_model, hot_space, mode="shift"), torch.no_grad(),
          warnings.catch_warnings()):
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated keyword's
        cache = DynamicCache(config=hot_model.config)
        hot_model(**inputs, **{keyword: cache}, use_cache=True)
        length = cache.get_seq_length()
        mask = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
        with pytest.raises(ValueError, match="an image arrived after the prefill"):
            hot_model(input_ids=torch.tensor([[IMAGE_TOKEN]]), attention_mask=mask,
                      pixel_values=inputs["pixel_values"], **{keyword: cache}, use_cache=True)
        assert cache.get_seq_length() == length  # no layer ran


@pytest.mark.parametrize("mode", ["shift", "contrast"])
def test_a_sampled_image_token_id_is_an_ordinary_token(hot_model, hot_space, mode):
    """Sampling can draw the image token's id; with no pixels it is a plain token: the step
    runs, steered as the same step is without the check (found by T = 1 sampling on the toy)."""
    inputs = JOBS[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
    step = {"input_ids": torch.tensor([[IMAGE_TOKEN]]), "attention_mask": mask, "use_cache": True}
    logits = []
    with torch.no_grad():
        for steered in (True, False):
            cache = DynamicCache(config=hot_model.config)
            with attach(hot_model, hot_space, mode=mode) if steered else contextlib.nullcontext():
                hot_model(**inputs, cache=cache, use_cache=True)
                logits.append(hot_model(**step, cache=cache).logits[:, -1])
    assert torch.isfinite(logits[0].max())  # contrast's cutoff leaves -inf below it, not nan
    assert not logits[0].isnan().any()
    assert not torch.equal(logits[0], logits[1])  # the step was steered, not skipped


def test_a_decoding_step_adds_to_the_sums_what_masked_sum_adds():
    """The in-place one-position update gives the bits of ``sum + masked_sum``: negative,
    tiny, infinite and nan values, masked and unmasked rows; but for an inf or nan at a masked
    position, which masked_sum leaves out and the step's product (0 x inf) turns into nan: a
    step's masked rows show no image (their own states non-finite: the row is lost anyway)."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(4, 8, generator=g)
    scale = torch.tensor([1e-30, 1.0, 1e30, 3.0])[:, None, None]
    hidden = torch.randn(4, 1, 8, generator=g) * scale
    hidden[0, 0, 0], hidden[1, 0, 1], hidden[2, 0, 2] = -0.0, float("inf"), float("nan")
    for dtype in (torch.float32, torch.bfloat16):
        mask = torch.tensor([[True], [False], [True], [False]])
        state = SteeringState(torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.long),
                              start.clone(), torch.tensor([3, 0, 1, 2]),
                              torch.tensor([True, True, True, False]))
        state.add_text(hidden.to(dtype), mask)
        total, count = masked_sum(hidden.to(dtype), mask)
        expected = start + total
        expected[1, 1] = float("nan")  # row 1 is masked: its inf times 0
        assert torch.equal(state.text_sum.isnan(), expected.isnan())
        assert torch.equal(torch.nan_to_num(state.text_sum), torch.nan_to_num(expected))
        assert torch.equal(state.text_count, torch.tensor([3, 0, 1, 2]) + count)


def test_the_per_call_object_holds_what_every_mode_needs_and_evidence_its_own():
    common = {"input_ids", "tokens", "labels_given", "image_input", "state", "text_now"}
    assert {f.name for f in dataclasses.fields(ForwardCall)} == common
    assert {f.name for f in dataclasses.fields(_EvidenceForward)} == common | {
        "word_moves", "affirm_moves", "phrase_moves"}


def test_the_kept_evidence_follows_the_cache_batch_operations():
    rows = torch.arange(3)
    state = EvidenceState(torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long),
                          torch.zeros(3, 4), torch.zeros(3, dtype=torch.long),
                          torch.ones(3, dtype=torch.bool), vision_pooled=rows[:, None] * 1.0)
    state.word_moves, state.phrase_moves = rows[:, None] * 10.0, rows[:, None] * 100.0
    state.reorder_cache(torch.tensor([2, 2, 0]))
    assert state.word_moves[:, 0].tolist() == [20.0, 20.0, 0.0]
    assert state.phrase_moves[:, 0].tolist() == [200.0, 200.0, 0.0]
    assert state.vision_pooled[:, 0].tolist() == [2.0, 2.0, 0.0]
    assert state.affirm_moves is None and state.asked is None  # unused fields stay None
    state.batch_repeat_interleave(2)
    assert state.word_moves[:, 0].tolist() == [20.0, 20.0, 20.0, 20.0, 0.0, 0.0]


EVIDENCE = {"kept at prefill": dict(mode="evidence", strength=6.0, phrase_strength=2.0,
                                    affirm=1.5, affirm_token_ids=(8, 20)),
            "read every step": dict(mode="evidence", strength=6.0, phrase_strength=2.0,
                                    image_weight=0.5)}


@pytest.mark.parametrize("name", sorted(EVIDENCE))
def test_concurrent_evidence_calls_equal_sequential_ones(hot_model, hot_space, name):
    """Two threads generating on one model, with beams (which reorder the kept moves), each
    get what they get alone."""
    plain = [generate(hot_model, job) for job in JOBS]
    with attach(hot_model, hot_space, **EVIDENCE[name]):
        greedy = [generate(hot_model, job) for job in JOBS]
        assert any(not same_output(g, p) for g, p in zip(greedy, plain))  # it steers
        for kwargs in ({}, {"num_beams": 2}):
            alone = [generate(hot_model, job, **kwargs) for job in JOBS]
            for _ in range(3):
                run = functools.partial(generate, hot_model, **kwargs)
                for got, expected in zip(run_concurrently(run, JOBS), alone):
                    assert same_output(got, expected)
