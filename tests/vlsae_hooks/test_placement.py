"""attach where users run models: a pipeline, a PEFT LoRA model, a ``torch.compile``d model, a
model whose steered layers accelerate offloaded to disk; and the caller's space object is never
changed."""

import pytest
import torch
from PIL import Image
from torch import nn

from eval_suites.toyworld.assets_paths import toy_paths
from vlsae_hooks import attach
from vlsae_hooks.placement import execution_device, requested_device, steerable_model
from vlsae_hooks.testing import random_space, tiny_llava

torch.set_num_threads(1)
STRONG = dict(mode="contrast", alpha=3.0, image_weight=1.0, contrast_weight=1.0,
              plausibility_cutoff=0.0)


def greedy(model, batch):
    return model.generate(**batch, max_new_tokens=6, do_sample=False)[:, -6:]


def test_pipeline_is_unwrapped_and_steered():
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(toy_paths().llava), device="cpu")
    space = random_space(pipe.model, layer=2)
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "describe the image ."}]}]

    def answer():
        return pipe(text=messages, max_new_tokens=8, do_sample=False,
                    return_full_text=False)[0]["generated_text"]

    plain = answer()
    with attach(pipe, space, **STRONG) as handle:
        assert handle.model is pipe.model
        steered = answer()
    assert steered != plain
    assert answer() == plain


def test_a_pipeline_around_a_peft_model_is_unwrapped_to_the_base_model():
    from peft import LoraConfig, get_peft_model
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(toy_paths().llava), device="cpu")
    base = pipe.model
    pipe.model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    assert steerable_model(pipe) is base


def test_peft_model_steers_its_base_model(batch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llava(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    base = model.get_base_model()
    space = random_space(base, layer=2)
    plain = greedy(model, batch)
    with attach(model, space, **STRONG) as handle:
        assert handle.model is base
        steered = greedy(model, batch)
    assert not torch.equal(plain, steered)
    assert torch.equal(greedy(model, batch), plain)


def test_a_compiled_model_is_unwrapped_and_its_generate_steered(batch):
    """``torch.compile(model)`` wraps the model; the wrapper's ``generate`` runs the model
    inside, so that is what is steered (hooks on the wrapper would never run). Nothing here
    calls the wrapper itself, so nothing is compiled."""
    model = tiny_llava()
    compiled = torch.compile(model)
    space = random_space(model, layer=2)
    plain = greedy(compiled, batch)
    with attach(model, space, **STRONG):
        expected = greedy(model, batch)
    with attach(compiled, space, **STRONG) as handle:
        assert handle.model is model
        assert torch.equal(greedy(compiled, batch), expected)
    assert not torch.equal(expected, plain)
    assert torch.equal(greedy(compiled, batch), plain)


def test_offloaded_steered_layers(tmp_path, batch):
    from transformers import LlavaForConditionalGeneration

    tiny_llava().save_pretrained(tmp_path / "model")
    in_memory = LlavaForConditionalGeneration.from_pretrained(tmp_path / "model")
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
                  "model.language_model.embed_tokens": "cpu",
                  "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "cpu",
                  "model.language_model.layers.2": "disk", "model.language_model.layers.3": "disk",
                  "model.language_model.norm": "cpu", "model.language_model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    offloaded = LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload"))
    layer = offloaded.model.language_model.layers[2]
    assert next(layer.parameters()).device.type == "meta"
    assert execution_device(layer) == torch.device("cpu")
    space = random_space(in_memory, layer=2)
    before = {k: v.clone() for k, v in space.state_dict().items()}
    with attach(in_memory, space, **STRONG):
        expected = greedy(in_memory, batch)
    with attach(offloaded, space, **STRONG):
        steered = greedy(offloaded, batch)
    assert torch.equal(steered, expected)
    assert not torch.equal(steered, greedy(offloaded, batch))
    assert all(torch.equal(before[k], v) for k, v in space.state_dict().items())


def test_execution_device_of_a_module_with_several_accelerate_hooks():
    """accelerate chains a module's hooks in a ``SequentialHook``: the one that moves the
    weights says where it runs, wherever it sits in the chain."""
    from accelerate.hooks import AlignDevicesHook, ModelHook, SequentialHook

    layer = nn.Linear(2, 2, device="meta")
    layer._hf_hook = SequentialHook(ModelHook(), AlignDevicesHook(execution_device=1))
    assert execution_device(layer) == torch.device("cuda:1")
    layer._hf_hook = AlignDevicesHook(execution_device="cpu")
    assert execution_device(layer) == torch.device("cpu")
    del layer._hf_hook
    with pytest.raises(ValueError, match="Linear has no weights on a real device"):
        execution_device(layer)


def test_callers_space_is_never_changed(model):
    space = random_space(model, layer=2).train()
    with attach(model, space, **STRONG) as handle:
        assert handle.space is not space and not handle.space.training
    assert space.training
    same = random_space(model, layer=2).eval()
    with attach(model, same, **STRONG) as handle:
        assert handle.space is same  # already in place: no copy


def test_not_a_model_is_refused():
    with pytest.raises(TypeError, match="needs a model, a transformers pipeline or a PEFT"):
        steerable_model("llava-hf/llava-1.5-7b-hf")


def test_a_named_device_is_checked_before_anything_loads():
    assert requested_device("cpu") == torch.device("cpu")
    assert requested_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device gpu0: .*gpu0"):
        requested_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device cuda:1: this machine has no CUDA device"):
            requested_device("cuda:1")


def test_the_default_device_follows_cuda_and_a_gpu_the_machine_lacks_is_refused(
        monkeypatch):
    """Whichever machine runs the test: CUDA's presence is what the default follows."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert requested_device(None) == torch.device("cuda")
    assert requested_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"^device cuda:2: this machine has 2 CUDA device\(s\), "
                                         r"cuda:0 to cuda:1$"):
        requested_device("cuda:2")  # a GPU it lacks: refused before a model is read
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert requested_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="^device cuda: this machine has no CUDA device; use cpu$"):
        requested_device("cuda")
