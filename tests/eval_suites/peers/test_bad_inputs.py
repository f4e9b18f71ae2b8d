"""What the peers refuse, with an error that says what to pass instead, and what they leave
alone: a prompt without an image decodes as it would without VCD. Prompts with images: the
peers' shared batch (``conftest.py``)."""

import pytest
import torch

from eval_suites.peers.dola import LayerContrast, candidate_layers
from eval_suites.peers.vcd import VisualContrast
from eval_suites.peers.vista import VisualSteering
from vlsae_hooks.testing import left_pad, tiny_qwen2_5_vl


def test_vcd_refuses_a_model_whose_image_features_need_more_than_pixels():
    with pytest.raises(ValueError, match="VCD here supports LLaVA-1.5 .* not 'qwen2_5_vl'"):
        VisualContrast(tiny_qwen2_5_vl())


@pytest.mark.parametrize("alpha,beta", [(-0.5, 0.1), (1.0, 0.0), (1.0, 1.5)])
def test_vcd_refuses_settings_outside_its_ranges(tiny_llava_model, alpha, beta):
    with pytest.raises(ValueError, match=rf"alpha >= 0 and 0 < beta <= 1, got alpha={alpha}, "
                                         rf"beta={beta}"):
        VisualContrast(tiny_llava_model, alpha=alpha, beta=beta)
    assert not tiny_llava_model._forward_hooks  # nothing was left attached


def test_vcd_needs_the_cache_and_the_ids_it_follows(tiny):
    tiny_llava_model, batch = tiny[0], dict(tiny[1])
    with VisualContrast(tiny_llava_model):
        with pytest.raises(ValueError, match="call generate with use_cache=True"):
            tiny_llava_model.generate(**batch, max_new_tokens=2, do_sample=False,
                                      use_cache=False)
        embeds = tiny_llava_model.get_input_embeddings()(batch.pop("input_ids"))
        with pytest.raises(ValueError, match="VCD needs input_ids"):
            tiny_llava_model.generate(inputs_embeds=embeds, **batch, max_new_tokens=2,
                                      do_sample=False)


def test_vcd_leaves_a_prompt_without_an_image_as_it_is(tiny):
    """The same contrast moves the tokens of prompts with an image: it is on, with nothing to
    distort."""
    tiny_llava_model, with_images = tiny
    for batch, changed in ((left_pad([[1, 3, 5, 6], [1, 3, 7, 8, 9]]), False),
                           (with_images, True)):
        plain = tiny_llava_model.generate(**batch, max_new_tokens=6, do_sample=False)
        with VisualContrast(tiny_llava_model, alpha=5.0):
            steered = tiny_llava_model.generate(**batch, max_new_tokens=6, do_sample=False)
        assert torch.equal(steered, plain) != changed


def test_dola_refuses_an_unknown_bucket_and_a_relative_top_outside_0_1(tiny_llava_model):
    with pytest.raises(ValueError, match="DoLa layers must be one of .* got 'middle'"):
        candidate_layers(8, "middle")
    for relative_top in (0.0, 1.5):
        with pytest.raises(ValueError, match=rf"relative_top must lie in \(0, 1\], got "
                                             rf"{relative_top}"):
            LayerContrast(tiny_llava_model, relative_top=relative_top)


def test_vista_needs_input_ids_to_build_its_null_prompt(tiny):
    tiny_llava_model, batch = tiny[0], dict(tiny[1])
    embeds = tiny_llava_model.get_input_embeddings()(batch.pop("input_ids"))
    with VisualSteering(tiny_llava_model), pytest.raises(ValueError, match="VISTA needs input_ids"):
        tiny_llava_model.generate(inputs_embeds=embeds, **batch, max_new_tokens=2,
                                  do_sample=False)
