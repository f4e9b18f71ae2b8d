"""The public test helpers of ``vlsae_hooks.testing``: the tiny models' generation ids, the
prompt and padding helpers, ``random_space``'s options and ``DispatchCount``'s counts."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from vlsae_hooks.testing import (
    BOS,
    EOS,
    IMAGE_TOKEN,
    PAD,
    DispatchCount,
    left_pad,
    llava_prompt,
    random_space,
    tiny_clip,
    tiny_llava,
    tiny_llava_next,
    tiny_processor,
    tiny_qwen2_5_vl,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("build", [tiny_llava, tiny_llava_next, tiny_qwen2_5_vl])
def test_tiny_models_carry_their_special_ids_and_are_in_eval_mode(build):
    model = build(n_layers=1)
    ids = model.generation_config
    assert (ids.pad_token_id, ids.bos_token_id, ids.eos_token_id) == (PAD, BOS, EOS)
    assert not model.training


def test_tiny_clip_is_in_eval_mode_and_a_family_without_a_tiny_processor_is_refused():
    assert not tiny_clip().training
    with pytest.raises(ValueError, match="no tiny processor for a 'mistral' model"):
        tiny_processor(SimpleNamespace(config=SimpleNamespace(model_type="mistral")))


@pytest.mark.parametrize("build, marks, n_image_tokens", [
    (tiny_llava, "<image>\n", 16), (tiny_llava_next, "<image>\n", 52),
    (tiny_qwen2_5_vl, "<|vision_start|><|image_pad|><|vision_end|>", 8)])
def test_tiny_processors_chat_as_llava_and_expand_an_image_as_their_model_reads_it(
        build, marks, n_image_tokens):
    """The chat template's prompt, every special token one id, and an image (32 x 64 px) spread
    over as many image tokens as the model's features: its forward takes them."""
    model = build(n_layers=1)
    processor = tiny_processor(model)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w1 w2"}]},
            {"role": "assistant", "content": "w3"}, {"role": "user", "content": "w4"}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    assert text == f"USER: {marks}w1 w2 ASSISTANT: w3 </s> USER: w4 ASSISTANT:"
    image = Image.fromarray(torch.zeros(32, 64, 3, dtype=torch.uint8).numpy())
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    image_at = ids.index(IMAGE_TOKEN)
    assert ids[:image_at] == [3] + ([IMAGE_TOKEN - 2] if "vision_start" in marks else [])
    assert ids.count(IMAGE_TOKEN) == n_image_tokens
    assert ids[image_at + n_image_tokens:] == (([IMAGE_TOKEN - 3] if "vision_end" in marks
                                                else []) + [7, 8, 4, 9, EOS, 3, 10, 4])
    assert model(**inputs).logits.shape[1] == len(ids)


@pytest.mark.parametrize("build", [tiny_llava, tiny_llava_next, tiny_qwen2_5_vl])
def test_tiny_processors_read_unknown_words_and_reload_from_a_folder(build, tmp_path):
    """Words outside the vocabulary are ``<unk>``, never a video token (Qwen's processor counts
    its video token in every text, and the model reads it as one); a system turn's text comes
    first, as LLaVA-1.5's ``llava_v1`` writes it (the protocols' system line); a model and its
    processor saved to a folder load back with ``AutoModelForImageTextToText`` /
    ``AutoProcessor``, chat template and image expansion as before."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = build(n_layers=1)
    processor = tiny_processor(model)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    chat = [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "Is there a w1 here?"}]}]
    text = reloaded.apply_chat_template(chat, add_generation_prompt=True)
    assert text == processor.apply_chat_template(chat, add_generation_prompt=True)
    system = [{"role": "system", "content": [{"type": "text", "text": "w9"}]}]
    assert reloaded.apply_chat_template(system + chat, add_generation_prompt=True) == f"w9 {text}"
    image = Image.fromarray(torch.zeros(40, 64, 3, dtype=torch.uint8).numpy())
    inputs = reloaded(images=[image], text=[text], return_tensors="pt")
    assert torch.equal(inputs["input_ids"],
                       processor(images=[image], text=[text], return_tensors="pt")["input_ids"])
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(5) == 4 and ids.count(IMAGE_TOKEN - 1) == 0  # <unk>: not video tokens
    again = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(again) is type(model)
    torch.testing.assert_close(again(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


def test_prompt_and_left_padding_ids():
    assert llava_prompt([5, 6], 3) == [BOS, 3, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 5, 6]
    batch = left_pad([[1, 5, 6], [1]])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [PAD, PAD, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_random_space_follows_its_options(model):
    space = random_space(model, layer=1, n_concepts=64, k=4, seed=3, site="layer_output",
                         aligner=False)
    config = space.config
    assert (config.layer, config.n_concepts, config.k, config.site) == (1, 64, 4, "layer_output")
    assert space.aligner is None and not config.has_aligner
    again = random_space(model, layer=1, n_concepts=64, k=4, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(space.sae.state_dict().values(),
                                                 again.sae.state_dict().values()))
    named = tiny_llava(n_layers=1)
    named.config._name_or_path = "toy/llava"
    assert random_space(named, layer=0).config.model_name == "toy/llava"


def test_dispatch_count_counts_reads_and_nonzero_only_while_running():
    x = torch.arange(4)
    with DispatchCount() as counter:
        x.nonzero()
        (x > 1).any().item()
        x[1:]
    assert counter.host_reads == 2 and counter.views == 1
    assert counter.kernels == counter.operations - 1 and counter.operations >= 4
    with DispatchCount(running=False) as idle:
        x.nonzero()
    assert (idle.operations, idle.views, idle.host_reads) == (0, 0, 0)


def test_left_pad_refuses_no_prompts_and_an_empty_prompt():
    with pytest.raises(ValueError, match="left_pad needs at least one prompt"):
        left_pad([])
    with pytest.raises(ValueError, match=r"prompt 1 is empty: every row needs at least one token"):
        left_pad([[1, 5], []])  # it would be a row the attention mask hides entirely
