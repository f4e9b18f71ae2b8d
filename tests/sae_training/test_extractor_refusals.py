"""What an extractor refuses before a batch runs: a site the family lacks, pooled scores without
a space, and a space trained anywhere but at the decoder layer the extraction reads."""

from types import SimpleNamespace

import pytest

from sae_training.extractors import VLMExtractor, make_extractor
from vlsae_hooks.testing import random_space, tiny_llava_next


def test_the_projector_site_is_llava_15s_only():
    model = tiny_llava_next()
    with pytest.raises(ValueError, match=r"projector_output site is implemented for LLaVA-1\.5 "
                                         r"\(model_type 'llava'\), not 'llava_next'"):
        make_extractor(model, SimpleNamespace(image_token="<image>"), site="projector_output")


def test_pooled_scores_need_a_space(llava):
    model, processor = llava
    with pytest.raises(ValueError, match=r"--scores pools a space's concept scores; name the "
                                         r"space with --codes-of"):
        make_extractor(model, processor, scores=True)
    with pytest.raises(ValueError, match=r"pooled concept scores need a space \(codes_of\)"):
        VLMExtractor(model, processor, scores=True)


def test_pooled_codes_need_a_space_of_the_decoder_layer_read(llava):
    model, processor = llava
    with pytest.raises(ValueError, match=r"pooled codes are read at a decoder layer; the space "
                                         r"was trained on 'projector_output'"):
        VLMExtractor(model, processor, layer=2, space_name="projector space",
                     space=random_space(model, site="projector_output"))
    with pytest.raises(ValueError, match=r"trained on layer_input of layer 1 \(128 wide\); this "
                                         r"extraction reads layer_input of layer 2 \(128 wide\): "
                                         r"pass the space's own --site and --layer"):
        VLMExtractor(model, processor, layer=2, space_name="layer 1 space",
                     space=random_space(model, layer=1))
    extractor = VLMExtractor(model, processor, layer=2, space_name="its space",
                             space=random_space(model, layer=2, n_concepts=32))
    assert (extractor.d_model, extractor.codes_of, extractor.pool) == (32, "its space", None)
