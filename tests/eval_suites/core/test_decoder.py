"""HFDecoder's answers and token counts on a tiny random LLaVA, with and without the pad and EOS
ids a fine-tune may leave unset."""

from __future__ import annotations

import pytest
from PIL import Image

from eval_suites.core.decoder import HFDecoder
from vlsae_hooks.testing import tiny_processor

CHAT = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")
IMAGES = [Image.new("RGB", (32, 32), (120, 30, 200)), Image.new("RGB", (32, 32), (9, 9, 9))]
PROMPTS = ["w1 w2", "w3"]


@pytest.fixture
def decoder(tiny_llava_model):
    processor = tiny_processor(tiny_llava_model)
    processor.chat_template = CHAT
    config = tiny_llava_model.generation_config
    saved = config.pad_token_id, config.eos_token_id
    yield HFDecoder(tiny_llava_model, processor, do_sample=False)
    config.pad_token_id, config.eos_token_id = saved


def test_answers_without_a_pad_or_an_eos_id(decoder) -> None:
    want = decoder.generate(IMAGES, PROMPTS, 4)
    assert [n for _, n in want] == [4, 4]  # the random model says no EOS in 4 tokens
    config = decoder.model.generation_config
    config.pad_token_id = None  # generate pads with the EOS id then
    assert decoder.generate(IMAGES, PROMPTS, 4) == want
    config.eos_token_id = None  # nothing ends an answer
    assert decoder.generate(IMAGES, PROMPTS, 4) == want


def test_an_answer_ends_at_its_eos_when_padding_with_it(decoder) -> None:
    processor, model = decoder.processor, decoder.model
    inputs = processor(images=IMAGES, text=[decoder.render(p) for p in PROMPTS],
                       return_tensors="pt", padding=True)
    first = int(model.generate(**inputs, max_new_tokens=1, do_sample=False)[0, -1])
    model.generation_config.pad_token_id = None
    model.generation_config.eos_token_id = first  # row 0 ends at once, then pads with it
    counts = [n for _, n in decoder.generate(IMAGES, PROMPTS, 4)]
    assert counts[0] == 1 and counts[1] > 1
