"""Which image each row shows (``image_of_rows``) and the wrong-image control's pick of another
row's (``other_rows``), beyond the cases the modes' tests go through."""

import pytest
import torch

from vlsae_hooks import attach
from vlsae_hooks.image_rows import image_of_rows, other_rows
from vlsae_hooks.testing import BOS, IMAGE_TOKEN, left_pad, llava_prompt

torch.set_num_threads(1)
IMAGE_IDS = torch.tensor([IMAGE_TOKEN])


def test_images_that_differ_in_one_value_are_different_images():
    rows = torch.zeros(3, 3, 2, 2)
    rows[1, 2, 1, 1] = 1.0  # rows 0 and 2 are one image (beams), row 1 differs in one pixel
    assert other_rows(rows).tolist() == [1, 2, 1]


def test_rows_without_an_image_keep_their_own_even_when_none_shows_one():
    assert other_rows(torch.arange(3.0)[:, None], torch.zeros(3, dtype=torch.bool)).tolist() == [
        0, 1, 2]


@torch.no_grad()
def test_a_text_only_call_under_the_wrong_image_control_is_left_alone(model, space):
    text_only = left_pad([[BOS, 3, 5, 6, 7], [BOS, 3, 9]])
    plain = model(**text_only).logits
    with attach(model, space, mode="contrast", image_source="other"):
        assert torch.equal(model(**text_only).logits, plain)


def rows_of(*prompts: list[int]) -> torch.Tensor:
    return torch.tensor([list(p) for p in prompts])


def test_a_row_with_part_of_an_image_is_refused():
    ids = rows_of(llava_prompt([5], 16), [BOS, 3] + [IMAGE_TOKEN] * 8 + [5] * 9)
    with pytest.raises(ValueError, match=r"rows \[1\] hold 8 image tokens where one image gives "
                                         r"16: this steering reads one image per prompt"):
        image_of_rows(ids, IMAGE_IDS, 2, 16)


@pytest.mark.parametrize("n_images, ids", [
    (2, rows_of(*[llava_prompt([5])] * 3)),  # three rows cannot be copies of two images
    (1, rows_of([BOS, 3] + [5] * 17))])  # an image, no row that shows it
def test_rows_that_are_not_whole_copies_of_the_images_are_refused(n_images, ids):
    shown = int((ids == IMAGE_TOKEN).any(1).sum())
    with pytest.raises(ValueError, match=rf"^{n_images} images for {shown} prompt rows with image "
                                         "tokens: this steering needs one image per prompt$"):
        image_of_rows(ids, IMAGE_IDS, n_images, 16)


def test_any_of_the_image_ids_marks_a_row_and_one_token_can_stand_for_an_image():
    """A model with a placeholder per image (no fixed token count) and two image ids."""
    image_ids = torch.tensor([IMAGE_TOKEN - 1, IMAGE_TOKEN])
    ids = rows_of([BOS, 5, IMAGE_TOKEN], [BOS, 5, 6], [BOS, IMAGE_TOKEN - 1, 6])
    assert image_of_rows(ids, image_ids, 2, None).tolist() == [0, -1, 1]
