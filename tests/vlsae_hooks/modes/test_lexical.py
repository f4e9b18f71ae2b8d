"""LexVLA steering: image evidence moves exactly the mapped words' logits, under greedy,
sampling and beam search, with or without the KV cache, and comes off cleanly (phrase units:
``test_lexical_phrases.py``)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers.spaces import lexvla_space
from transformers import DynamicCache

import vlsae_hooks
from vlsae_hooks.image_rows import image_of_rows, other_rows
from vlsae_hooks.modes.lexical import evidence_shift
from vlsae_hooks.spaces.lexvla import LexVLASpace
from vlsae_hooks.testing import BOS, IMAGE_TOKEN, left_pad, llava_prompt, random_space, tiny_llava

STRENGTH = 3.0


def inputs(n: int = 2) -> dict:
    batch = left_pad([llava_prompt([5 + i, 6, 7 + i][: 2 + i % 2]) for i in range(n)])
    batch["pixel_values"] = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return batch


@torch.no_grad()
def expected_shift(space: LexVLASpace, pixel_values: torch.Tensor) -> torch.Tensor:
    return evidence_shift(space.image_vectors(space.from_vlm_pixels(pixel_values)), STRENGTH)


@torch.no_grad()
def test_only_the_mapped_words_move_by_the_evidence(model):
    space, batch = lexvla_space([10, 20, 30]), inputs()
    plain = model(**batch).logits
    with vlsae_hooks.attach(model, space, strength=STRENGTH) as handle:
        steered = model(**batch).logits
        assert handle.attached
    others = torch.ones(plain.shape[-1], dtype=torch.bool)
    others[[10, 20, 30]] = False
    assert torch.equal(steered[..., others], plain[..., others])
    shift = expected_shift(space, batch["pixel_values"])
    assert (shift < 0).any() and (shift <= 0).all()
    assert torch.allclose(steered[..., [10, 20, 30]] - plain[..., [10, 20, 30]],
                          shift[:, None, :].expand(-1, plain.shape[1], -1), atol=1e-5)
    assert torch.equal(model(**batch).logits, plain)  # removed: the model is as before


def test_the_callers_space_is_never_changed(model):
    """As for the layer modes: a space in training mode (a LexVLA model being trained) is
    steered as an eval-mode copy, and one already in place is steered as it is."""
    space = lexvla_space([10, 20, 30]).train()
    with vlsae_hooks.attach(model, space, strength=STRENGTH) as handle:
        assert handle.space is not space and not handle.space.training
    assert space.training
    space.eval()
    with vlsae_hooks.attach(model, space, strength=STRENGTH) as handle:
        assert handle.space is space


@torch.no_grad()
def test_controls_uniform_evidence_and_other_image(model):
    space, batch = lexvla_space([10, 20, 30]), inputs()
    plain = model(**batch).logits
    with vlsae_hooks.attach(model, space, strength=STRENGTH, image_source="none"):
        assert torch.equal(model(**batch).logits, plain)
    with vlsae_hooks.attach(model, space, strength=STRENGTH, image_source="other"):
        steered = model(**batch).logits
    shift = expected_shift(space, batch["pixel_values"]).roll(-1, 0)
    assert torch.allclose(steered[:, -1, [10, 20, 30]] - plain[:, -1, [10, 20, 30]], shift,
                          atol=1e-5)
    same = torch.zeros(4, 1, 2, 2)
    same[2:] = 1.0  # rows 0,1 share an image, rows 2,3 share another (like beams)
    assert other_rows(same).tolist() == [2, 2, 0, 0]
    with pytest.raises(ValueError, match="two different images"):
        other_rows(torch.zeros(3, 1, 2, 2))
    shows = torch.tensor([True, False, True, True])  # row 1 shows no image: never taken
    assert other_rows(torch.arange(4.0)[:, None], shows).tolist() == [2, 1, 3, 0]
    with pytest.raises(ValueError, match="two different images"):  # one image, one text row
        other_rows(torch.arange(2.0)[:, None], torch.tensor([True, False]))
    # generate encodes each image once and expands its prompt's rows: they stay together
    with_image, text_only = llava_prompt([5]), [BOS, 3] + [5] * 17
    ids = torch.tensor([with_image, with_image, text_only, with_image, with_image])
    assert image_of_rows(ids, torch.tensor([IMAGE_TOKEN]), 2, 16).tolist() == [0, 0, -1, 1, 1]


def suppressing_space(model, batch) -> tuple[LexVLASpace, int]:
    """A space whose weakest word for this image is the plain greedy choice."""
    with torch.no_grad():
        first = int(model(**batch).logits[0, -1].argmax())
    ids = [t for t in (20, 30, 40, 50) if t != first][:3]
    space = lexvla_space(ids)
    with torch.no_grad():
        evidence = space.image_vectors(space.from_vlm_pixels(batch["pixel_values"]))[0]
    assert evidence.min() < evidence.max()
    space.vlm_token_ids[int(evidence.argmin())] = first
    return space, first


@pytest.mark.parametrize("strategy", [dict(do_sample=False), dict(do_sample=True, top_k=0,
                                      num_return_sequences=4), dict(num_beams=3, do_sample=False)])
def test_steering_acts_under_greedy_sampling_and_beam(model, strategy):
    batch = inputs(1)
    space, first = suppressing_space(model, batch)
    torch.manual_seed(0)
    plain = model.generate(**batch, max_new_tokens=4, **strategy)[:, batch["input_ids"].shape[1]:]
    with vlsae_hooks.attach(model, space, strength=1e4):
        torch.manual_seed(0)
        out = model.generate(**batch, max_new_tokens=4, **strategy)
    steered = out[:, batch["input_ids"].shape[1]:]
    if not strategy.get("do_sample"):
        assert plain[0, 0] == first
    assert not (steered == first).any()


def test_cached_and_uncached_decoding_agree(model):
    batch = inputs(2)
    space, _ = suppressing_space(model, batch)
    plain = model.generate(**batch, max_new_tokens=5, do_sample=False)
    runs = []
    for use_cache in (True, False):
        with vlsae_hooks.attach(model, space, strength=1e4):
            runs.append(model.generate(**batch, max_new_tokens=5, do_sample=False,
                                       use_cache=use_cache))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], plain)


@torch.no_grad()
def test_text_only_calls_and_option_errors(model):
    space = lexvla_space([10, 20, 30])
    text = left_pad([[1, 5, 6, 7]])
    plain = model(**text).logits
    with vlsae_hooks.attach(model, space) as handle:
        model(**inputs())  # an image call first: its evidence must not leak into the next call
        assert torch.equal(model(**text).logits, plain)
        with pytest.raises(RuntimeError, match="already attached"):
            vlsae_hooks.attach(model, space)
    assert not handle.attached
    with pytest.raises(TypeError, match="alpha is an option of .*contrast.*; mode 'lexical' takes"):
        vlsae_hooks.attach(model, space, alpha=0.5)
    with pytest.raises(ValueError, match="maps onto"):
        vlsae_hooks.attach(model, lexvla_space([-1, -1, -1]))


@torch.no_grad()
def test_four_bit_model_steers_the_same_words_and_reverts(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    tiny_llava(seed=0).save_pretrained(tmp_path)
    batch = inputs()
    try:
        quantised = LlavaForConditionalGeneration.from_pretrained(
            tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cpu")
        plain = quantised(**batch).logits
    except Exception as err:  # no usable bitsandbytes backend on this machine
        pytest.skip(f"bitsandbytes 4-bit cannot run here: {err}")
    assert isinstance(quantised.model.language_model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    space = lexvla_space([10, 20, 30])
    with vlsae_hooks.attach(quantised, space, strength=STRENGTH):
        steered = quantised(**batch).logits
    others = torch.ones(plain.shape[-1], dtype=torch.bool)
    others[[10, 20, 30]] = False
    assert torch.equal(steered[..., others], plain[..., others])
    # the evidence comes from the pixels, not the quantised tower: the same shift as full precision
    shift = expected_shift(space, batch["pixel_values"])
    assert torch.allclose(steered[..., [10, 20, 30]] - plain[..., [10, 20, 30]],
                          shift[:, None, :].expand(-1, plain.shape[1], -1), atol=1e-4)
    assert torch.equal(quantised(**batch).logits, plain)


@torch.no_grad()
def test_a_row_without_an_image_keeps_its_logits(model):
    """Images go to the rows that show one (by their image tokens), not by counting rows."""
    space = lexvla_space([10, 20, 30])
    batch = left_pad([llava_prompt([5, 6]), [1, 3, 5, 6, 7]])  # row 1: text only
    batch["pixel_values"] = inputs(1)["pixel_values"]
    plain = model(**batch).logits
    with vlsae_hooks.attach(model, space, strength=STRENGTH):
        steered = model(**batch).logits
    assert torch.equal(steered[1], plain[1])
    assert torch.allclose(steered[0, -1, [10, 20, 30]] - plain[0, -1, [10, 20, 30]],
                          expected_shift(space, batch["pixel_values"])[0], atol=1e-5)
    two_images = left_pad([llava_prompt([5], 32), [1, 3, 5, 6]])  # one prompt, two images
    two_images["pixel_values"] = inputs(2)["pixel_values"]
    with vlsae_hooks.attach(model, space, strength=STRENGTH):
        with pytest.raises(ValueError, match=r"rows \[0\] hold 32 image tokens where one image "
                                             "gives 16"):
            model(**two_images)


@torch.no_grad()
def test_a_failed_call_leaves_no_image_for_the_next(model):
    space, batch = lexvla_space([10, 20, 30]), inputs()
    text_only = left_pad([[1, 3, 5, 6, 7]])
    plain = model(**text_only).logits
    with vlsae_hooks.attach(model, space, strength=STRENGTH):
        with pytest.raises(ValueError):  # the tower ran, then the model refused the call
            model(**{**batch, "input_ids": batch["input_ids"][:, 4:],
                     "attention_mask": batch["attention_mask"][:, 4:]})
        assert torch.equal(model(**text_only).logits, plain)


@torch.no_grad()
def test_a_conversation_goes_on_with_tuple_outputs(model):
    space, batch = lexvla_space([10, 20, 30]), inputs(1)
    with vlsae_hooks.attach(model, space, strength=STRENGTH):
        first = model(**batch, use_cache=True, return_dict=False)
        step = model(input_ids=torch.tensor([[20]]), cache=first[1], use_cache=True,
                     return_dict=False)[0]
    plain = model(**batch, use_cache=True)
    plain_step = model(input_ids=torch.tensor([[20]]), cache=plain.cache).logits
    assert torch.allclose(step[0, -1, [10, 20, 30]] - plain_step[0, -1, [10, 20, 30]],
                          expected_shift(space, batch["pixel_values"])[0], atol=1e-5)


def test_models_and_vocabularies_it_cannot_steer_are_refused_at_attach(model):
    from vlsae_hooks.testing import tiny_llava_next

    with pytest.raises(ValueError, match="model_type 'llava'.*not 'llava_next'"):
        vlsae_hooks.attach(tiny_llava_next(), lexvla_space([10, 20, 30]))
    vocab = model.config.text_config.vocab_size
    for ids, message in (([10, 20, vocab], f"token id {vocab} but the model's vocabulary"),
                         ([10, -5, 30], "names token id -5")):
        with pytest.raises(ValueError, match=message):
            vlsae_hooks.attach(model, lexvla_space(ids))
    for ids in ([10, 20], [10, 20, 30, 40], [10, 20.0, 30]):  # a word left out, or not an id
        with pytest.raises(ValueError, match="must give each of the 3 words one integer"):
            lexvla_space(ids)


@torch.no_grad()
def test_a_non_finite_image_is_refused_naming_it(model):
    batch = inputs()
    batch["pixel_values"][1, 0, 3, 3] = float("nan")
    with vlsae_hooks.attach(model, lexvla_space([10, 20, 30]), strength=STRENGTH):
        with pytest.raises(FloatingPointError,
                           match=r"image\(s\) \[1\]: non-finite \(nan/inf\) pixel values"):
            model(**batch)


@torch.no_grad()
def test_a_failed_call_lets_go_of_its_cache_and_the_next_steers_as_before(model, monkeypatch):
    """The output hook is always called: a call that fails after its image tower ran lets go
    of the cache it was given (the memory a caller retrying after an out-of-memory error needs),
    and the next call steers as if it had never run."""
    space, batch = lexvla_space([10, 20, 30]), inputs()
    with vlsae_hooks.attach(model, space, strength=STRENGTH):
        expected = model(**batch).logits
        monkeypatch.setattr(model.model.language_model.layers[0], "forward",
                            lambda *args, **kwargs: 1 / 0)
        cache = DynamicCache(config=model.config)
        held = weakref.ref(cache)
        with pytest.raises(ZeroDivisionError):
            model(**batch, cache=cache, use_cache=True)
        del cache
        gc.collect()
        assert held() is None
        monkeypatch.undo()
        assert torch.equal(model(**batch).logits, expected)


def test_a_vlsae_space_and_a_prompt_given_as_embeddings_are_refused(model):
    with pytest.raises(ValueError, match=r"mode 'lexical' steers with a LexVLA space, not a "):
        vlsae_hooks.attach(model, random_space(model), mode="lexical")
    batch, plain = inputs(), model(**inputs()).logits
    embeds = model.get_input_embeddings()(batch.pop("input_ids"))
    with vlsae_hooks.attach(model, lexvla_space([10, 20, 30])):
        with pytest.raises(ValueError, match="LexVLA steering needs input_ids to find each "
                                             "row's image"):
            model(inputs_embeds=embeds, **batch)
    assert torch.equal(model(**inputs()).logits, plain)  # the failed call left nothing behind
