"""Steering with a static cache (``cache_implementation="static"``, or a ``StaticCache`` the
caller makes): ``generate`` then hands the model a 4-D attention mask and a cache whose length is
a tensor, and every mode decodes as with the default dynamic cache."""

from __future__ import annotations

import pytest
import torch
from helpers.spaces import STEERING, steering_spaces
from torch._dynamo.utils import counters
from transformers import CompileConfig, StaticCache

from vlsae_hooks import attach
from vlsae_hooks.testing import DispatchCount, left_pad, llava_prompt, tiny_llava

torch.set_num_threads(1)
DECODING = {"greedy": dict(do_sample=False), "beam": dict(do_sample=False, num_beams=3)}


@pytest.fixture(scope="module")
def static_model():
    """Its own tiny LLaVA: a static-cache ``generate`` notes its cache length on the model."""
    return tiny_llava()


@pytest.fixture(scope="module")
def spaces(static_model) -> dict:
    return steering_spaces(static_model)


@pytest.fixture(scope="module")
def inputs() -> dict:
    """Two left-padded rows: the 4-D mask has padding to show."""
    return {**left_pad([llava_prompt([5, 53, 7, 121, 8]), llava_prompt([11, 9])]),
            "pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))}


def generate(model, inputs: dict, **kwargs):
    return model.generate(**inputs, max_new_tokens=6, return_dict_in_generate=True,
                          output_logits=True, **kwargs)


def assert_same_decoding(a, b) -> None:
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)  # -inf where contrast cut, in both


@pytest.mark.parametrize("decoding", sorted(DECODING))
@pytest.mark.parametrize("mode", sorted(STEERING))
def test_every_mode_decodes_with_a_static_cache_as_with_a_dynamic_one(
        static_model, spaces, inputs, mode, decoding):
    kwargs = DECODING[decoding]
    with attach(static_model, spaces[mode], **STEERING[mode]):
        dynamic = generate(static_model, inputs, **kwargs)
        static = generate(static_model, inputs, cache_implementation="static", **kwargs)
    plain = generate(static_model, inputs, cache_implementation="static", **kwargs)
    assert_same_decoding(static, dynamic)
    assert not torch.equal(static.logits[-1], plain.logits[-1])  # the steering did steer


def host_reads(model, inputs: dict, new_tokens: int) -> int:
    """Device values read back by the host over a greedy static-cache ``generate``."""
    counter = DispatchCount()
    with counter, torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, cache_implementation="static")
    return counter.host_reads


@pytest.mark.parametrize("mode", sorted(STEERING))
def test_a_static_cache_step_reads_back_what_it_does_without_steering(
        static_model, spaces, inputs, mode):
    """The steering state does not make a static cache a dynamic one: ``generate`` still hands
    each step its 4-D mask, so the model does not rebuild it (which reads the cache's length
    back at every step), and a decoding step adds no read of its own (lexical mode read the
    cache's length at every step to tell a step from a prefill)."""
    # generate sizes a static cache for the longest call so far, and how many reads its mask
    # checks take depends on that size: every count below gets the 6-token size
    host_reads(static_model, inputs, 6)
    plain = {n: host_reads(static_model, inputs, n) for n in (1, 6)}
    with attach(static_model, spaces[mode], **STEERING[mode]):
        steered = {n: host_reads(static_model, inputs, n) for n in (1, 6)}
    assert steered[6] - steered[1] == plain[6] - plain[1]


def test_a_callers_static_cache_initialized_early_then_reset_for_another_mode(
        static_model, spaces, inputs):
    """Contrast holds its steered branch as extra rows of the layers from its site on; a cache
    the caller allocated for the batch's rows (``early_initialization``) gets them, and after a
    ``reset`` the same cache serves shift, whose rows are the batch's again."""
    text = static_model.config.get_text_config(decoder=True)
    cache = StaticCache(config=text, max_cache_len=48)
    cache.early_initialization(batch_size=2, num_heads=text.num_key_value_heads,
                               head_dim=text.hidden_size // text.num_attention_heads,
                               dtype=torch.float32, device=torch.device("cpu"))
    for mode in ("contrast", "shift"):
        with attach(static_model, spaces[mode], **STEERING[mode]):
            expected = generate(static_model, inputs, do_sample=False)
            cache.reset()
            assert_same_decoding(generate(static_model, inputs, do_sample=False, cache=cache),
                                 expected)


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"),
                    reason="transformers' compiled generate calls torch.compiler.is_exporting, "
                    "which this torch lacks: it fails without steering too")
def test_decoding_steps_compiled_by_generate_decode_the_same(static_model, spaces, inputs):
    """With a static cache on a GPU, ``generate`` compiles its decoding steps (``torch.compile``
    around the model's call, hooks included); forced here on the CPU, with dynamo's eager
    backend (dynamo's tracing and guards, not inductor's kernels)."""
    compile_config = CompileConfig(backend="eager", mode=None)
    compile_config._compile_all_devices = True  # transformers' own switch for compiling on a CPU
    torch._dynamo.reset()
    with attach(static_model, spaces["shift"], **STEERING["shift"]):
        expected = generate(static_model, inputs, do_sample=False)
        compiled = generate(static_model, inputs, do_sample=False, cache_implementation="static",
                            compile_config=compile_config)
    assert counters["stats"]["unique_graphs"] > 0  # the steps did run compiled
    assert_same_decoding(compiled, expected)


@pytest.mark.parametrize("early", [False, True])
def test_a_static_cache_that_served_contrast_serves_the_plain_model_after_reset(
        static_model, spaces, inputs, early):
    """After ``remove()`` and ``reset()``, the layers that held both branches' rows take the
    plain model's rows again (allocated anew at their first update), whether the caller
    allocated the cache up front or not; and contrast can take it back after another reset."""
    text = static_model.config.get_text_config(decoder=True)
    cache = StaticCache(config=text, max_cache_len=48)
    if early:
        cache.early_initialization(batch_size=2, num_heads=text.num_key_value_heads,
                                   head_dim=text.hidden_size // text.num_attention_heads,
                                   dtype=torch.float32, device=torch.device("cpu"))
    plain = generate(static_model, inputs, do_sample=False)
    with attach(static_model, spaces["contrast"], **STEERING["contrast"]):
        steered = generate(static_model, inputs, do_sample=False)
        assert_same_decoding(generate(static_model, inputs, do_sample=False, cache=cache),
                             steered)
    cache.reset()
    assert_same_decoding(generate(static_model, inputs, do_sample=False, cache=cache), plain)
    cache.reset()
    with attach(static_model, spaces["contrast"], **STEERING["contrast"]):
        assert_same_decoding(generate(static_model, inputs, do_sample=False, cache=cache),
                             steered)
