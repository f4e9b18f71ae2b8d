"""HFDecoder's answers and token counts on a tiny random LLaVA, with and without the pad and EOS
ids a fine-tune may leave unset."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import BatchFeature

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


class _Scripted:
    """A processor and model whose outputs are fixed: prompts 3 tokens wide, then ``new``."""

    def __init__(self, new: list[list[int]], eos, pad) -> None:
        self.tokenizer = SimpleNamespace()
        self.generation_config = SimpleNamespace(eos_token_id=eos, pad_token_id=pad)
        self.device, self.new, self.decoded = "cpu", torch.tensor(new), []

    def apply_chat_template(self, messages, add_generation_prompt):
        return repr((messages, add_generation_prompt))

    def __call__(self, images, text, return_tensors, padding):
        return BatchFeature({"input_ids": torch.full((len(text), 3), 7)})

    def generate(self, input_ids, max_new_tokens, **kwargs):
        return torch.cat([input_ids, self.new], dim=1)

    def decode(self, ids, skip_special_tokens):
        self.decoded.append((ids.tolist(), skip_special_tokens))
        return " " + "-".join(map(str, ids.tolist())) + " "


def test_token_counts_and_texts_with_several_eos_ids() -> None:
    # EOS ids 5 and 6, padding 0: a row ends at whichever EOS comes first
    fake = _Scripted([[11, 6, 0, 0], [12, 13, 5, 0], [14, 15, 16, 17]], eos=[5, 6], pad=0)
    decoder = HFDecoder(fake, fake)
    assert fake.tokenizer.padding_side == "left"
    assert decoder.generate([None] * 3, ["a", "b", "c"], 4) == [
        ("11-6", 2), ("12-13-5", 3), ("14-15-16-17", 4)]
    assert [skip for _, skip in fake.decoded] == [True] * 3


def test_without_an_eos_id_padding_ends_an_answer() -> None:
    fake = _Scripted([[11, 9, 9], [12, 13, 14]], eos=None, pad=9)
    assert HFDecoder(fake, fake).generate([None] * 2, ["a", "b"], 3) == [
        ("11", 1), ("12-13-14", 3)]


def test_prompt_turns_image_first_and_an_empty_system_prompt_is_none() -> None:
    fake = _Scripted([[1]], eos=2, pad=0)
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}
    system = {"role": "system", "content": [{"type": "text", "text": "S"}]}
    assert HFDecoder(fake, fake).render("q") == repr(([user], True))
    assert HFDecoder(fake, fake, system_prompt="").render("q") == repr(([user], True))
    assert HFDecoder(fake, fake, system_prompt="S").render("q") == repr(([system, user], True))
