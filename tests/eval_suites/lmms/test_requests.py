"""The plugin's request handling beyond answers in order (``test_model``): which requests share
a batch, which images and generation arguments reach ``generate``, how prompts place the images,
and which loading options reach ``from_pretrained``."""

import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval")

from helpers.lmms import requests_for

from eval_suites.lmms import model as plugin
from eval_suites.lmms.model import VICUNA_CHAT_TEMPLATE, VLSAELlava, cut_at_stops, generate_kwargs
from eval_suites.toyworld.assets_paths import toy_paths
from eval_suites.toyworld.world import heldout_scenes

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions. ")

ITEMS_TEMPLATE = ("{% for m in messages %}{% for item in m['content'] %}{% if item['type'] == "
                  "'image' %}<image>{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endfor %}"
                  "{% if add_generation_prompt %} =>{% endif %}")
"""A chat template that reads content items (string content renders empty)."""


def test_sampling_hands_generate_only_the_arguments_it_should_see():
    kwargs, _ = generate_kwargs({"temperature": 0.5, "top_p": 0, "top_k": 5, "length_penalty": 0.5,
                                 "no_repeat_ngram_size": 3, "repetition_penalty": None})
    # top_p 0 (a task's "none") is left out, and so is an argument set to None
    assert kwargs == {"max_new_tokens": 256, "do_sample": True, "num_beams": 1, "temperature": 0.5,
                      "top_k": 5, "length_penalty": 0.5, "no_repeat_ngram_size": 3}
    assert "top_p" not in generate_kwargs({"temperature": 0.5, "top_p": 1.0})[0]  # no cut
    assert cut_at_stops("a b c", ["", "b"]) == "a "  # an empty stop string cuts nothing


def test_answers_are_cut_at_the_first_stop_string_and_stripped():
    model = VLSAELlava(pretrained=str(toy_paths().llava))
    images = [s.image for s in heldout_scenes(5, 1)]
    model.task_dict = {"toy": {"test": [{"image": im} for im in images]}}

    def answer(**gen):
        return model.generate_until(requests_for(images, ["Describe the image."], [gen]))[0]

    assert answer(max_new_tokens=8) == "there is a blue star."
    assert answer(max_new_tokens=8, until="blue") == "there is a"  # a string is one stop
    assert answer(max_new_tokens=8, until=["star", "is"]) == "there"
    assert answer(max_new_tokens=3, until=[]) == "there is a"


def test_requests_are_batched_by_equal_arguments_longest_first(toy_llava_dir, monkeypatch):
    model = VLSAELlava(pretrained=str(toy_llava_dir), batch_size=2)
    assert model.batch_size == 2
    images = [s.image for s in heldout_scenes(5, 6)]
    model.task_dict = {"toy": {"test": [{"image": im} for im in images]}}
    prompts = ["a" * n for n in (3, 5, 1, 4, 2, 6)]
    same = {"max_new_tokens": 2, "temperature": 0}
    reordered = {"temperature": 0, "max_new_tokens": 2}  # the same arguments: one batch
    gen = [same, reordered, same, reordered, same, {"max_new_tokens": 3}]
    batches = []

    def answer(contexts, visuals, task_kwargs):
        batches.append((contexts, visuals, task_kwargs))
        return [c.upper() for c in contexts]

    monkeypatch.setattr(model, "_generate_batch", answer)
    cached = []
    monkeypatch.setattr(model.cache_hook, "add_partial", lambda *entry: cached.append(entry))
    # lmms-eval's doc_to_visual may give None for a doc without an image
    requests = requests_for(images, prompts, gen, visual=lambda doc: [doc["image"], None])
    assert model.generate_until(requests) == [p.upper() for p in prompts]
    assert [contexts for contexts, _, _ in batches] == [["aaaaa", "aaaa"], ["aaa", "aa"], ["a"],
                                                        ["aaaaaa"]]
    assert [kwargs for _, _, kwargs in batches] == [reordered, same, same, {"max_new_tokens": 3}]
    by_length = {len(p): im for p, im in zip(prompts, images)}
    for contexts, visuals, _ in batches:
        assert [[id(im) for im in row] for row in visuals] == [[id(by_length[len(c)])]
                                                               for c in contexts]
    assert sorted(cached) == sorted(("generate_until", (p, g), p.upper())
                                    for p, g in zip(prompts, gen))  # (prompts differ)


def test_prompts_place_one_image_token_per_image(toy_llava_dir):
    model = VLSAELlava(pretrained=str(toy_llava_dir))  # the toy's template reads content items
    assert model._prompt("Q?", 0) == "USER: Q? ASSISTANT:"
    assert model._prompt("Q?", 2) == "USER: <image>\n<image>\nQ? ASSISTANT:"
    assert model._prompt("Q?", 1) == "USER: <image>\nQ? ASSISTANT:"
    assert model._prompt("<image>\nQ?", 1) == "USER: <image>\nQ? ASSISTANT:"  # placed already
    model = VLSAELlava(pretrained=str(toy_llava_dir), chat_template=VICUNA_CHAT_TEMPLATE)
    assert model._prompt("Q?", 0) == VICUNA_SYSTEM + "USER: Q? ASSISTANT:"
    assert model._prompt("Q?", 2) == VICUNA_SYSTEM + "USER: <image> <image>\nQ? ASSISTANT:"
    assert model._prompt("<image>\nQ?", 1) == VICUNA_SYSTEM + "USER: <image>\nQ? ASSISTANT:"
    model = VLSAELlava(pretrained=str(toy_llava_dir), chat_template=ITEMS_TEMPLATE)
    assert model._prompt("<image>\nQ?", 2) == "<image><image>Q? =>"  # the given one, with items


@pytest.mark.parametrize("template", [None, VICUNA_CHAT_TEMPLATE])
def test_requests_with_two_images_or_none_generate(toy_llava_dir, template):
    model = VLSAELlava(pretrained=str(toy_llava_dir), chat_template=template, batch_size=3)
    a, b = (s.image for s in heldout_scenes(5, 2))
    model.task_dict = {"toy": {"test": [{"images": [a, b]}, {"images": []}, {"images": [None]}]}}
    answers = model.generate_until(requests_for([], ["Describe it."] * 3,
                                                [{"max_new_tokens": 2}] * 3,
                                                visual=lambda doc: doc["images"]))
    assert len(answers) == 3 and answers[1] == answers[2]  # [] and [None]: the text alone
    model.task_dict = {"toy": {"test": [{"images": []}, {"images": [None]}]}}
    alone = model.generate_until(requests_for([], ["Describe it."] * 2, [{"max_new_tokens": 2}] * 2,
                                              visual=lambda doc: doc["images"]))
    assert alone == answers[1:]  # a batch without images hands the processor none
    rgba = a.convert("RGBA")
    rgba.putalpha(0)  # transparent: the processor puts it on white, as under llava_hf (PIL's
    # convert("RGB") would drop the alpha and show a's pixels)
    white = Image.new("RGB", a.size, (255, 255, 255))
    model.task_dict = {"toy": {"test": [{"images": [rgba]}, {"images": [white]},
                                        {"images": [a]}]}}
    answers = model.generate_until(requests_for([], ["Describe it."] * 3,
                                                [{"max_new_tokens": 4}] * 3,
                                                visual=lambda doc: doc["images"]))
    assert answers[0] == answers[1] != answers[2]


def test_refuses_auto_batch_size(toy_llava_dir):
    with pytest.raises(ValueError, match="fixed --batch_size N"):
        VLSAELlava(pretrained=str(toy_llava_dir), batch_size="auto:4")


def test_loading_options_reach_from_pretrained(toy_llava_dir, monkeypatch):
    seen = {}
    load_model = plugin.AutoModelForImageTextToText.from_pretrained
    load_processor = plugin.AutoProcessor.from_pretrained

    def model_spy(path, **kwargs):
        seen["model"] = dict(kwargs)
        kwargs.pop("quantization_config", None)  # 4-bit loading needs a GPU
        return load_model(path, **kwargs)

    def processor_spy(path, **kwargs):
        seen["processor"] = kwargs
        return load_processor(path, **kwargs)

    monkeypatch.setattr(plugin.AutoModelForImageTextToText, "from_pretrained", model_spy)
    monkeypatch.setattr(plugin.AutoProcessor, "from_pretrained", processor_spy)
    model = VLSAELlava(pretrained=str(toy_llava_dir), dtype="bfloat16", revision="v2",
                       device_map="cpu", load_in_4bit=True, attn_implementation="eager")
    assert model.model.dtype == torch.bfloat16
    assert seen["model"]["quantization_config"].load_in_4bit
    assert {k: seen["model"][k] for k in ("dtype", "revision", "device_map",
                                          "attn_implementation")} == {
        "dtype": torch.bfloat16, "revision": "v2", "device_map": "cpu",
        "attn_implementation": "eager"}
    assert seen["processor"] == {"revision": "v2"}
    VLSAELlava(pretrained=str(toy_llava_dir))
    assert {k: seen["model"][k] for k in ("dtype", "revision", "device_map")} == {
        "dtype": "auto", "revision": "main", "device_map": {"": torch.device("cpu")}}
    assert "quantization_config" not in seen["model"]


def test_takes_rank_and_device_from_accelerate_across_processes(toy_llava_dir, monkeypatch):
    class SecondOfTwo:
        num_processes, process_index, device = 2, 1, torch.device("cpu")

    monkeypatch.setattr(plugin, "Accelerator", SecondOfTwo)
    model = VLSAELlava(pretrained=str(toy_llava_dir))
    assert (model.rank, model.world_size, model.device) == (1, 2, torch.device("cpu"))
    monkeypatch.setattr(SecondOfTwo, "num_processes", 1)
    model = VLSAELlava(pretrained=str(toy_llava_dir))
    assert (model.rank, model.world_size) == (0, 1)
