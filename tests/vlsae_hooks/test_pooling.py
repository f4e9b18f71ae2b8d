"""Where the image and the text are: the prefill's position masks."""

import torch

from vlsae_hooks.pooling import prefill_masks
from vlsae_hooks.testing import IMAGE_TOKEN


def test_prefill_masks_skip_padding_and_pre_image_tokens():
    ids = torch.tensor([[0, 0, 1, 3, IMAGE_TOKEN, IMAGE_TOKEN, 9, 10], [1, 3, 5, 6, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    vision, text = prefill_masks(ids, mask, torch.tensor([IMAGE_TOKEN]))
    assert vision.tolist() == [[0, 0, 0, 0, 1, 1, 0, 0], [0] * 8]
    assert text.tolist() == [[0, 0, 0, 0, 0, 0, 1, 1], [0] * 8]  # no image -> not steered
