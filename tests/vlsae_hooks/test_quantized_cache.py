"""Steering with transformers' quantized KV cache (``cache_implementation="quantized"``, the
optimum-quanto backend, from the dev extra): the steering state lives in whatever cache
``generate`` makes, so every mode that keeps one decodes as with the dynamic cache, up to what
quantizing the keys and values changes."""

from __future__ import annotations

import pytest
import torch
from helpers.spaces import STEERING

from vlsae_hooks import attach

QUANTIZED = dict(cache_implementation="quantized",
                 cache_config={"backend": "quanto", "nbits": 4, "residual_length": 2})
"""4 bits with a short full-precision residual: most of the cache is quantized by the last step."""


def generate(model, batch: dict, **kwargs):
    return model.generate(**batch, max_new_tokens=8, do_sample=False,
                          return_dict_in_generate=True, output_logits=True, **kwargs)


def largest_gap(a, b) -> float:
    """The largest difference between two decodings' logits, over the tokens both keep
    finite (contrast cuts some to -inf)."""
    gaps = [(x - y)[x.isfinite() & y.isfinite()].abs().max() for x, y in zip(a.logits, b.logits,
                                                                               strict=True)]
    return float(max(gaps))


@pytest.fixture(scope="module")
def plain(model, batch) -> dict:
    """Unsteered decodings with each cache, and how far quantizing moves the logits."""
    dynamic = generate(model, batch)
    quantized = generate(model, batch, **QUANTIZED)
    return {"quantized": quantized, "gap": largest_gap(dynamic, quantized)}


@pytest.mark.parametrize("mode", sorted(STEERING))
def test_every_mode_decodes_with_a_quantized_cache_as_with_a_dynamic_one(
        model, spaces, batch, plain, mode):
    with attach(model, spaces[mode], **STEERING[mode]):
        dynamic = generate(model, batch)
        quantized = generate(model, batch, **QUANTIZED)
    assert 0 < plain["gap"] < 0.1  # the cache was quantized, and these logits tell it apart
    assert torch.equal(quantized.sequences, dynamic.sequences)
    # no further from the dynamic cache than quantizing alone takes unsteered decoding
    assert largest_gap(quantized, dynamic) < 2 * plain["gap"]
    # and steered: further from plain decoding with the same cache than quantizing moves logits
    assert largest_gap(quantized, plain["quantized"]) > 5 * plain["gap"]
    assert torch.equal(generate(model, batch, **QUANTIZED).sequences,
                       plain["quantized"].sequences)  # removed: plain again
