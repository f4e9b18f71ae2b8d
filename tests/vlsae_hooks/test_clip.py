"""CLIP: the projection hooks record concept codes; zero-shot scores combine both views."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers.spaces import clip_space, small_space
from torch import nn

from vlsae_hooks.clip import ClipConceptHandle, zero_shot_classify
from vlsae_hooks.testing import random_space, tiny_clip

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def space(model):
    """16 concepts, 8 active: an image's and a prompt's codes share concepts, so their cosines
    (the concept scores) are not all 0."""
    return clip_space(model, n_concepts=16)


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(2)
    # the last row left-padded: CLIP's causal text tower pools at </s>, so only a pad before
    # it can change the text embedding (and show whether the mask reaches CLIP)
    return dict(pixel_values=torch.randn(3, 3, 32, 32),
                input_ids=torch.tensor([[1, 5, 6, 2], [1, 7, 8, 2], [0, 1, 9, 2]]),
                attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]]))


def projected(clip, inputs):
    """Projected (unnormalised) image and text embeddings, the tensors the space encodes."""
    with torch.no_grad():
        image = clip.visual_projection(clip.vision_model(inputs["pixel_values"]).pooler_output)
        text = clip.text_projection(clip.text_model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output)
    return image, text


def test_handle_records_concepts_and_removes(model, tiny_clip_model, inputs):
    space = clip_space(model, aligner=True)  # each modality its own projection
    image, text = projected(tiny_clip_model, inputs)
    with ClipConceptHandle(tiny_clip_model, space) as handle:
        tiny_clip_model(**inputs)  # with autograd on: the records keep no graph
        assert torch.equal(handle.image_embeds, image) and torch.equal(handle.text_embeds, text)
        assert not handle.image_embeds.requires_grad and not handle.text_embeds.requires_grad
        z = handle.image_concepts
        assert z.shape == (3, 256) and ((z != 0).sum(-1) == 8).all()
        assert torch.equal(z, space.encode(image, "vision"))
        assert not torch.equal(z, space.encode(image, "text"))
        assert torch.equal(handle.text_concepts, space.encode(text, "text"))
        assert not torch.equal(handle.text_concepts, space.encode(text, "vision"))
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
    assert expected.min() > 1  # codes that overlap, on CLIP's logit scale (exp(2.66) = 14.3)
    torch.testing.assert_close(scores.plain, plain)
    torch.testing.assert_close(scores.concept, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores.combined, 0.75 * plain + 0.25 * expected)
    assert torch.equal(zero_shot_classify(tiny_clip_model, space, **inputs, weight=0.0).combined,
                       plain)
    assert torch.equal(zero_shot_classify(tiny_clip_model, space, **inputs, weight=1.0).combined,
                       scores.concept)
    for weight in (-0.1, 1.1):
        with pytest.raises(ValueError, match=rf"weight must lie in \[0, 1\], got {weight}"):
            zero_shot_classify(tiny_clip_model, space, **inputs, weight=weight)


def test_zero_shot_scores_come_in_clips_dtype(space, inputs):
    """A bfloat16 CLIP beside a float32 space: all three scores in bfloat16, as CLIP's own."""
    clip = tiny_clip().to(torch.bfloat16)
    scores = zero_shot_classify(clip, space, **{**inputs, "pixel_values":
                                                inputs["pixel_values"].bfloat16()}, weight=0.5)
    assert [score.dtype for score in scores] == [torch.bfloat16] * 3


def test_clip_errors(model, tiny_clip_model, space):
    with pytest.raises(ValueError, match="needs a CLIPModel"):
        ClipConceptHandle(model, space)
    wrong = random_space(model)
    with pytest.raises(ValueError, match="not on CLIP's projected embeddings"):
        ClipConceptHandle(tiny_clip_model, wrong)
    narrow = small_space(has_aligner=False)
    narrow.config.site = "clip_embeds"
    with pytest.raises(ValueError, match="encodes 8-wide embeddings, this CLIP projects to 64"):
        ClipConceptHandle(tiny_clip_model, narrow)
    other = nn.Module()  # projections, but not a CLIP's config
    other.config = SimpleNamespace(model_type="siglip", projection_dim=64)
    other.visual_projection, other.text_projection = nn.Linear(64, 64), nn.Linear(64, 64)
    with pytest.raises(ValueError, match="needs a CLIPModel.*got Module"):
        ClipConceptHandle(other, space)
