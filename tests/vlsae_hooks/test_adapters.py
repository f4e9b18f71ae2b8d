"""One adapter per family: the parts are found by the model's own structure, and steering
works end to end on tiny LLaVA-NeXT and Qwen2.5-VL models as on LLaVA-1.5."""

import contextlib
from types import SimpleNamespace

import pytest
import torch
from helpers.spaces import STEERING, steering_spaces
from PIL import Image

from vlsae_hooks import attach
from vlsae_hooks.adapters import ADAPTERS, adapter_for
from vlsae_hooks.testing import (
    BOS,
    IMAGE_TOKEN,
    options_of,
    random_space,
    tiny_llava_next,
    tiny_processor,
    tiny_qwen2_5_vl,
)

torch.set_num_threads(1)


def llava_next_inputs(model):
    torch.manual_seed(5)
    pixel_values, image_sizes = torch.randn(1, 3, 3, 32, 32), torch.tensor([[32, 64]])
    n_tokens = model.model.get_image_features(pixel_values=pixel_values,
                                              image_sizes=image_sizes).pooler_output[0].shape[0]
    ids = torch.tensor([[BOS, 3] + [IMAGE_TOKEN] * n_tokens + [5, 6, 7]])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                image_sizes=image_sizes)


def qwen_inputs(model):
    torch.manual_seed(5)
    ids = torch.tensor([[BOS, IMAGE_TOKEN - 2] + [IMAGE_TOKEN] * 4 + [IMAGE_TOKEN - 3, 5, 6, 7]])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values=torch.randn(16, 3 * 2 * 8 * 8),
                image_grid_thw=torch.tensor([[1, 4, 4]]))


FAMILIES = {"llava_next": (tiny_llava_next, llava_next_inputs),
            "qwen2_5_vl": (tiny_qwen2_5_vl, qwen_inputs)}


def test_llava_parts_are_the_llava_hf_modules(model):
    adapter = adapter_for(model)
    assert adapter is ADAPTERS["llava"]
    assert adapter.layers(model) is model.model.language_model.layers
    assert adapter.norm(model) is model.model.language_model.norm
    assert adapter.head(model) is model.lm_head
    assert adapter.vision_projector(model) is model.model.multi_modal_projector
    assert adapter.vision_tower(model) is model.model.vision_tower
    assert adapter.vision_token_ids(model) == (IMAGE_TOKEN,)
    assert adapter.hidden_size(model) == 64


def test_qwen_parts():
    model = tiny_qwen2_5_vl()
    adapter = adapter_for(model)
    assert adapter.vision_projector(model) is model.model.visual.merger
    assert adapter.vision_tower(model) is model.model.visual
    assert adapter.vision_token_ids(model) == (IMAGE_TOKEN, IMAGE_TOKEN - 1)


def test_vision_token_ids_are_the_ones_the_config_sets():
    qwen, llava = ADAPTERS["qwen2_5_vl"], ADAPTERS["llava"]
    no_video = SimpleNamespace(config=SimpleNamespace(image_token_id=9, video_token_id=None))
    assert qwen.vision_token_ids(no_video) == (9,)
    assert qwen.vision_token_ids(SimpleNamespace(config=SimpleNamespace(video_token_id=4))) == (4,)
    for config in (SimpleNamespace(image_token_id=None), SimpleNamespace()):
        with pytest.raises(ValueError, match=r"LLaVA-1\.5 \(llava-hf\) config has none of "
                                             r"\('image_token_id',\)"):
            llava.vision_token_ids(SimpleNamespace(config=config))


def test_inner_model_without_head_gets_a_clear_error(model):
    with pytest.raises(ValueError, match="has no `lm_head`.*ForConditionalGeneration"):
        adapter_for(model.model).head(model.model)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mode", ["contrast", "shift"])
def test_family_steers_and_reverts(family, mode):
    build, make_inputs = FAMILIES[family]
    model = build()
    assert adapter_for(model) is ADAPTERS[family]
    inputs = make_inputs(model)
    plain_logits = model(**inputs).logits
    plain = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    strong = dict(alpha=3.0, image_weight=1.0, contrast_weight=1.0, plausibility_cutoff=0.0)
    with attach(model, random_space(model, layer=2), mode=mode, **options_of(mode, strong)):
        steered = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        beams = model.generate(**inputs, max_new_tokens=4, do_sample=False, num_beams=2)
    assert not torch.equal(plain, steered)
    assert beams.shape[0] == 1
    assert torch.equal(model(**inputs).logits, plain_logits)


def processor_batch(processor, images: list[Image.Image], words: list[str]) -> dict:
    """One prompt per image, through the family's processor and its chat template, padded on
    the left as generate wants."""
    texts = [processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": text}]}], add_generation_prompt=True)
        for text in words]
    processor.tokenizer.padding_side = "left"
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mode", [None, "contrast", "shift", "reference", "evidence", "grounding"])
def test_family_steers_a_processor_batch_of_other_shapes_row_by_row(family, mode):
    """Images of three shapes (any-resolution tiles, Qwen's image grids: each row its own
    number of image tokens, padded on the left) decode batched as each row alone, plain and
    steered, in every mode of a space (evidence: word and phrase readouts; grounding: a patch
    readout, which reads every image position whatever their number)."""
    model = FAMILIES[family][0]()
    processor = tiny_processor(model)
    generator = torch.Generator().manual_seed(7)
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=generator,
                                            dtype=torch.uint8).numpy())
              for h, w in [(32, 64), (64, 32), (40, 40)]]
    words = ["w1 w2", "w3", "w4 w5 w6 w7"]
    batch = processor_batch(processor, images, words)
    counts = (batch["input_ids"] == IMAGE_TOKEN).sum(1).tolist()
    assert len(set(counts)) > 1  # the rows hold different numbers of image tokens
    strong = dict(alpha=3.0, image_weight=1.0, contrast_weight=1.0, plausibility_cutoff=0.0)
    decode = dict(max_new_tokens=4, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    plain = model.generate(**batch, **decode).logits[0]
    if mode in ("evidence", "grounding"):  # spaces with readouts, options that move them
        steering = attach(model, steering_spaces(model)[mode], **STEERING[mode])
    else:
        steering = (contextlib.nullcontext() if mode is None else  # attach hooks at once
                    attach(model, random_space(model, layer=2), mode=mode,
                           **options_of(mode, strong)))
    with steering:
        together = model.generate(**batch, **decode)
        moved = (together.logits[0] - plain).abs().amax(-1)  # each row's first token
        assert (moved > 0.1).tolist() == [mode is not None] * 3
        for row, (image, text) in enumerate(zip(images, words)):
            alone = model.generate(**processor_batch(processor, [image], [text]), **decode)
            assert torch.equal(together.sequences[row, -4:], alone.sequences[0, -4:])
            for step_together, step_alone in zip(together.logits, alone.logits, strict=True):
                torch.testing.assert_close(step_together[row], step_alone[0], atol=1e-4,
                                           rtol=1e-4)


def shapes_batch(processor) -> dict:
    """A processor batch of two images of other shapes, padded on the left."""
    generator = torch.Generator().manual_seed(7)
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=generator,
                                            dtype=torch.uint8).numpy())
              for h, w in [(32, 64), (40, 40)]]
    return processor_batch(processor, images, ["w1 w2", "w4 w5 w6"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mode", ["contrast", "shift", "reference"])
def test_family_decodes_with_a_static_cache_as_with_a_dynamic_one(family, mode):
    """With a static cache ``generate`` hands Qwen2.5-VL's model one 4-D mask per attention
    type ({"full_attention": mask}, its config names its layers' types); steering reads the
    padding from it as from LLaVA-NeXT's single mask."""
    model = FAMILIES[family][0]()
    batch = shapes_batch(tiny_processor(model))
    decode = dict(max_new_tokens=4, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    strong = dict(alpha=3.0, image_weight=1.0, contrast_weight=1.0, plausibility_cutoff=0.0)
    with attach(model, random_space(model, layer=2), mode=mode, **options_of(mode, strong)):
        dynamic = model.generate(**batch, **decode)
        static = model.generate(**batch, **decode, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    for x, y in zip(static.logits, dynamic.logits, strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    plain = model.generate(**batch, **decode, cache_implementation="static")
    assert not torch.equal(plain.logits[0], static.logits[0])


@pytest.mark.parametrize("mode", ["contrast", "shift"])
def test_a_qwen_conversation_goes_on_after_another_prompt_with_its_rope_offsets_set_back(mode):
    """Qwen2.5-VL keeps the last prefill's multimodal rope offsets on the model
    (``model.model.rope_deltas``), not in the cache, and a continued turn reads them: set back
    (docs/guarantees.md), another conversation in between changes nothing."""
    model = tiny_qwen2_5_vl()
    processor = tiny_processor(model)
    generator = torch.Generator().manual_seed(7)
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=generator,
                                            dtype=torch.uint8).numpy())
              for h, w in [(32, 64), (64, 32), (40, 40), (64, 64)]]
    mine = processor_batch(processor, images[:2], ["w1 w2", "w3"])
    other = processor_batch(processor, images[2:], ["w4 w5 w6", "w8"])
    first = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False,
                 return_dict_in_generate=True)

    def second_turn(turn):
        ids = torch.cat([turn.sequences, torch.tensor([[9, 10, 11], [12, 13, 14]])], 1)
        answered = mine["attention_mask"]
        mask = torch.cat([answered, answered.new_ones(2, ids.shape[1] - answered.shape[1])], 1)
        return model.generate(input_ids=ids, attention_mask=mask, cache=turn.cache,
                              max_new_tokens=4, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)

    strong = dict(alpha=3.0, image_weight=1.0, contrast_weight=1.0, plausibility_cutoff=0.0)
    with attach(model, random_space(model, layer=2), mode=mode, **options_of(mode, strong)):
        straight = second_turn(model.generate(**mine, **first))
        turn = model.generate(**mine, **first)
        offsets = model.model.rope_deltas
        model.generate(**other, **first)
        assert not torch.equal(model.model.rope_deltas, offsets)  # the other prompt's now
        model.model.rope_deltas = offsets
        after_another = second_turn(turn)
    assert torch.equal(after_another.sequences, straight.sequences)
    for x, y in zip(after_another.logits, straight.logits, strict=True):
        assert torch.equal(x, y)
