"""On a CUDA GPU (skipped without one): every mode decodes a GPU model as it decodes the same
model on the CPU; a decoding step makes no CUDA synchronisation (CUDA's own check, not a count
of dispatched operations); greedy, sampling and beams run; removing the handle restores the
model exactly; a bitsandbytes 4-bit model loaded on the GPU by our loader steers and is
restored; and with the space left on the CPU, lexical mode steers a GPU model as the same model
on the CPU and CLIP's zero-shot scores come out on the GPU."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers.spaces import clip_space, lexvla_space, space_with_readouts
from huggingface_hub import constants

from sae_training.extractors import load_model
from vlsae_hooks import attach
from vlsae_hooks.clip import zero_shot_classify
from vlsae_hooks.testing import (
    left_pad,
    llava_prompt,
    options_of,
    tiny_clip,
    tiny_llava,
    tiny_processor,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = "cuda"
STRONG = dict(alpha=3.0, image_weight=1.0, contrast_weight=1.0, plausibility_cutoff=0.0)
MODES = {"contrast": dict(mode="contrast", **options_of("contrast", STRONG)),
         "shift": dict(mode="shift", **options_of("shift", STRONG)),
         "reference": dict(mode="reference", **options_of("reference", STRONG)),
         "evidence": dict(mode="evidence", strength=5.0, phrase_strength=1.0, affirm=1.0,
                          affirm_token_ids=(8,))}


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 off (cuDNN's convolutions use it by default): GPU and CPU then agree to rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def cpu_model():
    return tiny_llava()


@pytest.fixture(scope="module")
def gpu_model():
    return tiny_llava().to(GPU)


@pytest.fixture(scope="module")
def cpu_space(cpu_model):
    """A random space at decoder layer 2 with word and phrase readouts (evidence mode)."""
    return space_with_readouts(cpu_model)


def inputs_on(device: str) -> dict:
    """Two left-padded prompts of different lengths, each with its own image."""
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    rows = left_pad([llava_prompt([5, 6, 7, 8, 9]), llava_prompt([9, 10])])
    return {name: value.to(device) for name, value in {**rows, "pixel_values": pixels}.items()}


def greedy(model, inputs: dict, new_tokens: int = 6):
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, return_dict_in_generate=True, output_logits=True)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_mode_decodes_on_the_gpu_as_on_the_cpu(cpu_model, gpu_model, cpu_space, mode):
    with attach(cpu_model, cpu_space, **MODES[mode]):
        on_cpu = greedy(cpu_model, inputs_on("cpu"))
    plain = greedy(gpu_model, inputs_on(GPU))
    with attach(gpu_model, cpu_space, **MODES[mode]):  # the space is copied to the GPU
        on_gpu = greedy(gpu_model, inputs_on(GPU))
    assert torch.equal(on_gpu.sequences.cpu(), on_cpu.sequences)
    for gpu_step, cpu_step in zip(on_gpu.logits, on_cpu.logits, strict=True):
        torch.testing.assert_close(gpu_step.cpu(), cpu_step, atol=2e-4, rtol=2e-4)
    assert not torch.equal(on_gpu.logits[0], plain.logits[0])  # it steered


def syncs_per_forward(model, inputs: dict, new_tokens: int = 6) -> list[int]:
    """CUDA synchronisations (``torch.cuda.set_sync_debug_mode``) in each forward of a greedy
    generate (the prefill first, then one per decoding step), from the first decoder layer's
    input to the end of the forward, after every steering hook."""
    counts: list[int] = []

    def start(*args) -> None:
        counts.append(-len(caught))
        torch.cuda.set_sync_debug_mode("warn")

    def stop(*args) -> None:
        torch.cuda.set_sync_debug_mode("default")
        counts[-1] += sum("synchronizing" in str(w.message) for w in caught)

    layer = model.model.language_model.layers[0]
    hooks = [layer.register_forward_pre_hook(start), model.register_forward_hook(stop)]
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            greedy(model, inputs, new_tokens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        for hook in hooks:
            hook.remove()
    return counts


@pytest.mark.parametrize("mode", ["contrast", "shift", "evidence"])
def test_a_decoding_step_makes_no_cuda_synchronisation(gpu_model, cpu_space, mode):
    """The prefill may wait for the device (the image's and the prompt's checks); a decoding
    step may not."""
    inputs = inputs_on(GPU)
    plain = syncs_per_forward(gpu_model, inputs)
    with attach(gpu_model, cpu_space, **MODES[mode]):
        steered = syncs_per_forward(gpu_model, inputs)
    assert len(steered) == len(plain) == 6
    assert steered[1:] == plain[1:] == [0] * 5, (plain, steered)


@pytest.mark.parametrize("mode", ["contrast", "shift"])
@pytest.mark.parametrize("decoding", [dict(do_sample=True, top_k=0), dict(num_beams=3)])
def test_sampling_and_beams_run_on_the_gpu(gpu_model, cpu_space, mode, decoding):
    inputs = inputs_on(GPU)
    torch.manual_seed(0)
    with attach(gpu_model, cpu_space, **MODES[mode]):
        out = gpu_model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, **decoding)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 6) and out.device.type == "cuda"


def test_removing_the_handle_restores_the_gpu_model_exactly(gpu_model, cpu_space):
    inputs = inputs_on(GPU)
    before = greedy(gpu_model, inputs)
    for options in MODES.values():
        with attach(gpu_model, cpu_space, **options):
            greedy(gpu_model, inputs)
    after = greedy(gpu_model, inputs)
    assert torch.equal(after.sequences, before.sequences)
    assert all(torch.equal(a, b) for a, b in zip(after.logits, before.logits, strict=True))


@pytest.mark.filterwarnings("ignore:the concept space was trained for")
def test_a_four_bit_model_on_the_gpu_steers_and_is_restored(cpu_space, tmp_path, monkeypatch):
    """Loaded by our loader as a user loads a real model offline (no Hub kernels)."""
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = tiny_llava()
    for part in (model, tiny_processor(model)):
        part.save_pretrained(tmp_path)
    quantised, _ = load_model(str(tmp_path), load_in_4bit=True, device=GPU)
    quantised.generation_config.pad_token_id = 0
    assert isinstance(quantised.model.language_model.layers[0].self_attn.q_proj,
                      bnb.nn.Linear4bit)
    inputs = inputs_on(GPU)
    inputs["pixel_values"] = inputs["pixel_values"].to(quantised.dtype)
    before = greedy(quantised, inputs)
    for mode in ("contrast", "shift", "evidence"):
        with attach(quantised, cpu_space, **MODES[mode]):
            steered = greedy(quantised, inputs)
        assert not torch.equal(steered.logits[0], before.logits[0]), mode
    after = greedy(quantised, inputs)
    assert torch.equal(after.sequences, before.sequences)
    assert all(torch.equal(a, b) for a, b in zip(after.logits, before.logits, strict=True))


def test_lexical_mode_steers_a_gpu_model_with_the_space_on_the_cpu(cpu_model, gpu_model):
    """The LexVLA space is copied to the vision tower's device, as the layer modes' is."""
    space = lexvla_space([10, 20, 30])
    with attach(cpu_model, space, strength=3.0):
        on_cpu = greedy(cpu_model, inputs_on("cpu"))
    plain = greedy(gpu_model, inputs_on(GPU))
    with attach(gpu_model, space, strength=3.0) as handle:
        on_gpu = greedy(gpu_model, inputs_on(GPU))
    assert torch.equal(on_gpu.sequences.cpu(), on_cpu.sequences)
    for gpu_step, cpu_step in zip(on_gpu.logits, on_cpu.logits, strict=True):
        torch.testing.assert_close(gpu_step.cpu(), cpu_step, atol=2e-4, rtol=2e-4)
    assert not torch.equal(on_gpu.logits[0], plain.logits[0])  # it steered
    assert handle.space.device.type == "cuda" and space.device.type == "cpu"


def test_clip_zero_shot_scores_a_gpu_clip_with_the_space_on_the_cpu(cpu_model):
    """The codes come from the space's device; the scores are CLIP's device's, as on the CPU."""
    space = clip_space(cpu_model, n_concepts=16)  # image and prompt codes share concepts
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    inputs = dict(pixel_values=pixels, input_ids=torch.tensor([[1, 5, 6, 2], [1, 9, 8, 2]]))
    on_cpu = zero_shot_classify(tiny_clip(), space, **inputs, weight=0.25)
    assert on_cpu.concept.min() > 3  # not all 0: the concept scores' scale and norms are compared
    on_gpu = zero_shot_classify(tiny_clip().to(GPU), space,
                                **{name: value.to(GPU) for name, value in inputs.items()},
                                weight=0.25)
    assert space.device.type == "cpu"
    for gpu_scores, cpu_scores in zip(on_gpu, on_cpu, strict=True):
        assert gpu_scores.device.type == "cuda"
        torch.testing.assert_close(gpu_scores.cpu(), cpu_scores, atol=2e-4, rtol=2e-4)
