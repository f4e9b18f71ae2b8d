"""The batch the layer-steering peers (VTI, VISTA) are tested on: three left-padded prompts of
different lengths with random images, on the shared tiny random LLaVA."""

import pytest
import torch
from helpers.peers import TEXTS

from vlsae_hooks.testing import left_pad, llava_prompt


@pytest.fixture(scope="module")
def tiny(tiny_llava_model):
    torch.set_num_threads(1)
    model = tiny_llava_model
    inputs = left_pad([llava_prompt(t) for t in TEXTS])
    inputs["pixel_values"] = torch.randn(
        len(TEXTS), 3, 32, 32, generator=torch.Generator().manual_seed(0)
    )
    return model, inputs
