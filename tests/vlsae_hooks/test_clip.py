"""CLIP: the projection hooks record concept codes; zero-shot scores combine both views."""

import pytest
import torch
import torch.nn.functional as F
from helpers.spaces import clip_space

from vlsae_hooks.clip import ClipConceptHandle, zero_shot_classify
from vlsae_hooks.testing import random_space

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def space(model):
    return clip_space(model)


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(2)
    return dict(pixel_values=torch.randn(3, 3, 32, 32),
                input_ids=torch.tensor([[1, 5, 6, 2], [1, 7, 8, 2], [1, 9, 2, 0]]),
                attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]))


def projected(clip, inputs):
    """Projected (unnormalised) image and text embeddings, the tensors the space encodes."""
    with torch.no_grad():
        image = clip.visual_projection(clip.vision_model(inputs["pixel_values"]).pooler_output)
        text = clip.text_projection(clip.text_model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output)
    return image, text


def test_handle_records_concepts_and_removes(tiny_clip_model, space, inputs):
    image, text = projected(tiny_clip_model, inputs)
    with ClipConceptHandle(tiny_clip_model, space) as handle:
        tiny_clip_model(**inputs)
        assert torch.equal(handle.image_embeds, image) and torch.equal(handle.text_embeds, text)
        z = handle.image_concepts
        assert z.shape == (3, 256) and ((z != 0).sum(-1) == 8).all()
        assert torch.equal(handle.text_concepts, space.encode(text, "text"))
    assert not tiny_clip_model.visual_projection._forward_hooks
    assert not tiny_clip_model.text_projection._forward_hooks


def test_zero_shot_scores(tiny_clip_model, space, inputs):
    scores = zero_shot_classify(tiny_clip_model, space, **inputs, weight=0.25)
    with torch.no_grad():
        plain = tiny_clip_model(**inputs).logits_per_image
    image, text = projected(tiny_clip_model, inputs)
    z_image, z_text = space.encode(image, "vision"), space.encode(text, "text")
    expected = (tiny_clip_model.logit_scale.exp() * F.normalize(z_image, dim=-1)
                @ F.normalize(z_text, dim=-1).T)
    torch.testing.assert_close(scores.plain, plain)
    torch.testing.assert_close(scores.concept, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores.combined, 0.75 * plain + 0.25 * expected)
    assert torch.equal(zero_shot_classify(tiny_clip_model, space, **inputs, weight=0.0).combined,
                       plain)


def test_clip_errors(model, tiny_clip_model, space):
    with pytest.raises(ValueError, match="needs a CLIPModel"):
        ClipConceptHandle(model, space)
    wrong = random_space(model)
    with pytest.raises(ValueError, match="not on CLIP's projected embeddings"):
        ClipConceptHandle(tiny_clip_model, wrong)
