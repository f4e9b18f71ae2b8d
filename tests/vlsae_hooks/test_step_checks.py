"""A steered forward's input checks by hand: a prompt's image tokens are refused only without an
image or a video (pixels or encoded), nan/inf is looked for only in the rows asked about and is
blamed on the image only when the image holds it."""

import pytest
import torch

from vlsae_hooks.step_checks import check_finite, check_image_given, check_image_vectors

torch.set_num_threads(1)
IMAGE, VIDEO = 7, 8
VISION_IDS = torch.tensor([IMAGE, VIDEO])


@pytest.mark.parametrize("given", [{"pixel_values_videos": torch.zeros(1, 3)},
                                   {"mm_encoder_outputs": {"video": torch.zeros(1, 3)}},
                                   {"mm_encoder_outputs": {"image": torch.zeros(1, 3)}}])
def test_a_prompt_with_video_tokens_and_a_video_is_not_refused(given):
    check_image_given(given, torch.tensor([[1, VIDEO, VIDEO, 2]]), VISION_IDS)
    with pytest.raises(ValueError, match="holds image tokens but the call has no image"):
        check_image_given({}, torch.tensor([[1, VIDEO, VIDEO, 2]]), VISION_IDS)


def test_non_finite_values_count_only_in_the_rows_asked_about():
    """A row left out (no image: unsteered) may hold nan; one asked about is named."""
    x = torch.ones(3, 4)
    x[1, 2] = float("nan")
    check_finite(x, torch.tensor([True, False, True]), "text", 2)
    with pytest.raises(FloatingPointError, match=r"batch row\(s\) \[1\]: .* text positions at "
                                                 r"the input of decoder layer 2"):
        check_finite(x, torch.tensor([True, True, True]), "text", 2)


def test_a_finite_image_is_not_blamed_for_the_models_overflow():
    x = torch.ones(2, 4)
    x[0, 0] = float("inf")
    rows = torch.tensor([True, True])
    with pytest.raises(FloatingPointError, match="the model itself overflowed"):
        check_finite(x, rows, "image", 1, image=torch.zeros(2, 3, 4, 4))
    with pytest.raises(FloatingPointError, match="the image input is non-finite"):
        check_finite(x, rows, "image", 1, image=[torch.zeros(3, 4, 4), torch.full((3,), -x[0, 0])])


def test_image_vectors_blame_the_pixels_that_hold_nan_and_name_them():
    pixels, vectors = torch.zeros(3, 3, 2, 2), torch.ones(3, 5)
    check_image_vectors(vectors, pixels)
    pixels[2, 1, 0, 0] = float("nan")  # vectors finite: the pixels alone are named
    with pytest.raises(FloatingPointError, match=r"image\(s\) \[2\]: .* pixel values"):
        check_image_vectors(vectors, pixels)
    vectors[0, 4] = float("inf")  # both: the pixels are blamed, every bad image named
    with pytest.raises(FloatingPointError, match=r"image\(s\) \[0, 2\]: .* pixel values"):
        check_image_vectors(vectors, pixels)
    pixels[2, 1, 0, 0] = 0.0
    with pytest.raises(FloatingPointError, match=r"image\(s\) \[0\]: .* image vectors"):
        check_image_vectors(vectors, pixels)
