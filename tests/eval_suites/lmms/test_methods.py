"""The lmms-eval plugin's steering methods: each steers with what the shipped toy spaces hold,
plain answers equal the stock llava_hf model's, and the controls and peers run."""

import sys

import pytest
from PIL import Image

pytest.importorskip("lmms_eval")

from helpers.lmms import requests_for

from eval_suites.lmms.model import VICUNA_CHAT_TEMPLATE, VLSAELlava
from eval_suites.toyworld.world import heldout_scenes


def test_word_evidence_methods_steer_with_the_shipped_spaces():
    from eval_suites.toyworld.assets_paths import TOY_DIR, toy_paths

    llava = toy_paths().llava
    with pytest.raises(ValueError, match="needs space="):
        VLSAELlava(pretrained=str(llava), method="lexvla")
    images = [s.image for s in heldout_scenes(5, 8)[6:]]  # the second names an absent blue ring
    prompts = ["Describe the image."] * 2
    answers = {}
    for method, extra in [("greedy", {}),
                          ("lexvla", {"space": str(TOY_DIR / "lexvla"), "strength": 50.0}),
                          ("vlsae-evidence", {"strength": 50.0})]:
        model = VLSAELlava(pretrained=str(llava), method=method, batch_size=2, **extra)
        model.task_dict = {"toy": {"test": [{"image": im} for im in images]}}
        answers[method] = model.generate_until(requests_for(images, prompts,
                                                            [{"max_new_tokens": 24}] * 2))
    assert answers["lexvla"] != answers["greedy"]  # a strong lexical prior rewrites the captions
    assert answers["vlsae-evidence"] != answers["greedy"]
    affirming = VLSAELlava(pretrained=str(llava), method="vlsae-evidence", affirm=0.15)
    yes = affirming.processor.tokenizer.convert_tokens_to_ids("yes")
    assert affirming.steering.options.affirm_token_ids == (yes,)  # "Yes" is "yes" to this tokenizer
    assert affirming.steering.options.affirm == 0.15
    recommended = VLSAELlava(pretrained=str(llava), method="vlsae")  # as the toy space recommends
    assert recommended.steering.mode == "grounding"
    assert (recommended.steering.options.strength, recommended.steering.options.threshold) == (4, 1)
    contrast = VLSAELlava(pretrained=str(llava), method="vlsae-contrast", batch_size=2)
    reference = VLSAELlava(pretrained=str(llava), method="vlsae-reference", batch_size=2)
    assert (contrast.steering.mode, reference.steering.mode) == ("contrast", "reference")
    for model in (contrast, reference):  # the cached contrast computes what the reference does
        model.task_dict = {"toy": {"test": [{"image": im} for im in images]}}
    ask = requests_for(images, POPE_QUESTIONS[:2], [{"max_new_tokens": 4}] * 2)
    assert contrast.generate_until(ask) == reference.generate_until(ask)
    with pytest.raises(ValueError, match="knows none of the affirming words"):
        VLSAELlava(pretrained=str(llava), method="vlsae-evidence", affirm=0.15, affirm_words="oui")
    with pytest.raises(ValueError, match="knows none of the affirming words"):  # without affirm
        VLSAELlava(pretrained=str(llava), method="vlsae-evidence", affirm_words="oui")
    with pytest.raises(ValueError, match=r"dtype='fp16': vlsae_llava loads the model in one of"):
        VLSAELlava(pretrained=str(llava), dtype="fp16")


def test_grounding_method_steers_with_a_patch_readout():
    from eval_suites.toyworld.assets_paths import toy_paths

    llava = toy_paths().llava  # its space holds the box readout; the caption one lies beside
    with pytest.raises(ValueError, match=r"unknown model_args \['alpha'\]"):
        VLSAELlava(pretrained=str(llava), method="vlsae-grounding", alpha=0.5)
    for method, other in (("vlsae-evidence", "alpha"), ("vlsae-shift", "contrast_weight")):
        with pytest.raises(ValueError, match=rf"unknown model_args \['{other}'\]"):
            VLSAELlava(pretrained=str(llava), method=method, **{other: 0.5})
    images = [s.image for s in heldout_scenes(5, 8)[6:]]  # the second names an absent blue ring
    ask = requests_for(images, ["Describe the image."] * 2, [{"max_new_tokens": 24}] * 2)
    answers = {}
    for method, extra in [("greedy", {}), ("vlsae-grounding", {"strength": 50.0}),
                          ("vlsae-grounding", {"strength": 50.0, "threshold": 0.5,
                                               "readout": str(llava / "patch_readout_captions")})]:
        model = VLSAELlava(pretrained=str(llava), method=method, batch_size=2, **extra)
        model.task_dict = {"toy": {"test": [{"image": im} for im in images]}}
        answers[method, len(extra)] = model.generate_until(ask)
    assert model.steering.mode == "grounding"
    assert (model.steering.options.strength, model.steering.options.threshold) == (50.0, 0.5)
    assert answers["vlsae-grounding", 1] != answers["greedy", 0]
    assert answers["vlsae-grounding", 3] != answers["greedy", 0]


POPE_QUESTIONS = ["Is there a red star in the image?", "Is there a blue ring in the image?",
                  "Is there a green square in the image?", "Is there a yellow circle in the image?",
                  "Is there a red ring in the image?"]
POPE_GENERATION = {"max_new_tokens": 8, "temperature": 0, "top_p": 1.0, "num_beams": 1,
                   "do_sample": False, "until": ["\n\n"]}
"""The toy POPE task's generation arguments as lmms-eval hands them (it adds ``until``)."""
STRING_TOY_TEMPLATE = ("{% for message in messages %}USER: {{ message['content'] }} {% endfor %}"
                       "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
"""The toy model's chat template for string content, as ``llava_hf`` hands it: the toy's own
template reads content items, so ``llava_hf`` would render it without the question."""


def stock_llava_hf(monkeypatch):
    """lmms-eval's ``llava_hf`` class; ``decord`` (video only) is stubbed if missing."""
    import importlib
    import types

    if importlib.util.find_spec("decord") is None:
        stub = types.SimpleNamespace(VideoReader=None, cpu=None)
        monkeypatch.setitem(sys.modules, "decord", stub)
    return importlib.import_module("lmms_eval.models.simple.llava_hf")


def pope_answers(model, images: list[Image.Image]) -> list[str]:
    model.task_dict = {"toy": {"test": [{"image": im} for im in images]}}
    return model.generate_until(requests_for(images, POPE_QUESTIONS,
                                             [dict(POPE_GENERATION) for _ in images]))


def test_greedy_answers_match_the_stock_llava_hf(monkeypatch):
    from eval_suites.toyworld.assets_paths import toy_paths

    stock = stock_llava_hf(monkeypatch)
    assert VICUNA_CHAT_TEMPLATE == stock.VICUNA_CHAT_TEMPLATE
    llava = str(toy_paths().llava)
    images = [s.image for s in heldout_scenes(5, len(POPE_QUESTIONS))]
    wanted = []
    for ours, theirs in [({}, STRING_TOY_TEMPLATE), ({"chat_template": VICUNA_CHAT_TEMPLATE},
                                                     VICUNA_CHAT_TEMPLATE)]:
        # llava_hf's default device_map "" fails under transformers 5; it batches one at a time
        reference = stock.LlavaHf(pretrained=llava, device="cpu", device_map="cpu",
                                  chat_template=theirs)
        model = VLSAELlava(pretrained=llava, method="greedy", batch_size=2, device_map="cpu",
                           attn_implementation="eager", revision="main", **ours)
        wanted.append(pope_answers(reference, images))
        assert pope_answers(model, images) == wanted[-1]
    assert set(wanted[0]) == {"yes", "no"}  # the toy's own prompt: both answers occur
    assert set(wanted[1]) <= {"yes", "no"}  # Vicuna's system prompt is new to the toy model
    assert model.model.config._attn_implementation == "eager"
    assert model.chat_template == VICUNA_CHAT_TEMPLATE


def test_cutoff_control_and_vista_methods():
    from eval_suites.toyworld.assets_paths import toy_paths

    llava = toy_paths().llava
    images = [s.image for s in heldout_scenes(6, len(POPE_QUESTIONS))]
    greedy = pope_answers(VLSAELlava(pretrained=str(llava), method="greedy", batch_size=5),
                          images)
    cutoff = VLSAELlava(pretrained=str(llava), method="vlsae-cutoff", batch_size=5)
    assert cutoff.steering.mode == "contrast"
    assert cutoff.steering.options.contrast_weight == 0.0
    assert pope_answers(cutoff, images) == greedy  # greedy's top token always survives
    with pytest.raises(ValueError, match="contrast_weight"):
        VLSAELlava(pretrained=str(llava), method="vlsae-cutoff", contrast_weight=0.5)
    control = VLSAELlava(pretrained=str(llava), method="vlsae-contrast", image_source="other")
    assert control.steering.options.image_source == "other"  # the wrong-image control
    vista = VLSAELlava(pretrained=str(llava), method="vista", vista_lambda=0.2, batch_size=5)
    assert vista.steering.lam == 0.2
    assert len(pope_answers(vista, images)) == len(images)
