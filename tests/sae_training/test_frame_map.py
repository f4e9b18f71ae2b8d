"""Boxes map into the processed frame exactly as the image processor maps the image: resize,
centre crop or pad, for the torchvision and PIL processors and LLaVA's padding one."""

import pytest
import torch
from PIL import Image, ImageDraw

from sae_training.frame_map import FrameMap, processed_frame
from sae_training.patch_readout import patch_targets

torch.set_num_threads(1)


def test_boxes_map_into_the_processed_frame_as_the_processor_maps_the_image(llava):
    processor = llava[1].image_processor  # shortest side to 32, then the centre 32 x 32
    frame = processed_frame(processor, 64, 48)  # resized to 42 x 32, cropped from x = 5
    assert frame == FrameMap(42 / 64, 32 / 48, -5.0, 0.0, 32, 32)
    assert frame.box((16, 12, 48, 36)) == (5.5, 8.0, 26.5, 24.0)
    assert frame.box((60, 0, 64, 10)) is None  # right of the centre square: cropped away
    assert frame.box((0, 0, 64, 48)) == (0.0, 0.0, 32.0, 32.0)
    targets = patch_targets([[(frame.box((16, 12, 48, 36)), [0])]], grid=4, image_size=32,
                            n_units=1, min_cover=0.5)  # columns 0 and 3 are 2.5 / 8 covered
    assert targets[0, :, 0].view(4, 4).tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0],
                                                    [0, 0, 0, 0]]
    assert processed_frame(processor, 30, 20).box((0, 0, 30, 20)) == (0.0, 0.0, 32.0, 32.0)
    assert processed_frame(processor, 48, 64) == FrameMap(32 / 48, 42 / 64, 0.0, -5.0, 32, 32)


@pytest.mark.parametrize("backend", ["torchvision", "pil", "llava_pad", "small_crop",
                                     "llava_pad_wide"])
def test_the_map_agrees_with_the_processed_pixels(backend):
    """A white box painted on a black image lands where the map puts it (within a pixel:
    resampling blurs its edges)."""
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil, LlavaImageProcessor

    settings = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                    do_normalize=False)
    processor, size = {
        "torchvision": (CLIPImageProcessor(**settings), (77, 50)),
        "pil": (CLIPImageProcessorPil(**settings), (50, 91)),
        "llava_pad": (LlavaImageProcessor(do_pad=True, image_mean=[0, 0, 0], **settings),
                      (90, 60)),
        "small_crop": (CLIPImageProcessor(size={"height": 27, "width": 23},
                                          crop_size={"height": 32, "width": 32},
                                          do_normalize=False), (46, 54)),
        "llava_pad_wide": (LlavaImageProcessor(do_pad=True, size={"height": 20, "width": 40},
                                               do_center_crop=False, do_normalize=False),
                           (60, 30)),  # padded 15 above, then squeezed to half the height
    }[backend]
    box = (size[0] * 0.3, size[1] * 0.25, size[0] * 0.7, size[1] * 0.8)
    picture = Image.new("RGB", size)
    ImageDraw.Draw(picture).rectangle([round(v) for v in box[:2]] +
                                      [round(v) - 1 for v in box[2:]], fill=(255, 255, 255))
    pixels = processor(images=picture, return_tensors="pt")["pixel_values"][0, 0]
    rows, columns = (pixels > 0.5).any(1).nonzero()[:, 0], (pixels > 0.5).any(0).nonzero()[:, 0]
    seen = (columns.min().item(), rows.min().item(), columns.max().item() + 1,
            rows.max().item() + 1)
    mapped = processed_frame(processor, *size).box(tuple(map(round, box)))
    assert max(abs(a - b) for a, b in zip(seen, mapped)) <= 1.0, (seen, mapped)


@pytest.mark.parametrize("backend, offset", [("torchvision", (-5, 2)), ("pil", (-5, 3)),
                                             ("llava_pad", (0, 10))])
def test_without_a_resize_the_map_is_exact_to_the_pixel(backend, offset):
    """Odd gaps: a 41 x 20 image cropped to 30 wide (5 cut on the left) and 25 high (padded by
    2 above in torchvision, 3 with PIL), or padded to 41 x 41 (10 above)."""
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil, LlavaImageProcessor

    settings = dict(do_resize=False, crop_size={"height": 25, "width": 30}, do_normalize=False)
    processor = {"torchvision": lambda: CLIPImageProcessor(**settings),
                 "pil": lambda: CLIPImageProcessorPil(**settings),
                 "llava_pad": lambda: LlavaImageProcessor(do_pad=True, do_resize=False,
                                                          do_center_crop=False,
                                                          do_normalize=False)}[backend]()
    picture = Image.new("RGB", (41, 20))
    picture.putpixel((20, 9), (255, 255, 255))
    pixels = processor(images=picture, return_tensors="pt")["pixel_values"][0, 0]
    frame = processed_frame(processor, 41, 20)
    assert (frame.width, frame.height) == tuple(pixels.shape[::-1])
    assert (frame.offset_x, frame.offset_y) == offset
    row, column = (pixels > 0.5).nonzero()[0].tolist()
    assert frame.box((20, 9, 21, 10)) == (column, row, column + 1, row + 1)


def test_a_frame_wider_than_high_cuts_boxes_to_its_own_sides():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"height": 20, "width": 40}, do_center_crop=False)
    frame = processed_frame(processor, 80, 80)  # squeezed to 40 x 20
    assert frame == FrameMap(0.5, 0.25, 0.0, 0.0, 40, 20)
    assert frame.box((-8, -8, 200, 200)) == (0.0, 0.0, 40.0, 20.0)
    assert frame.box((0, 0, 10, 0)) is None and frame.box((0, 0, 0, 10)) is None


@pytest.mark.parametrize("settings, message", [
    (dict(do_pad=True), "SimpleNamespace pads images in a way this map does not know"),
    (dict(do_resize=True, size={"longest_edge": 32}), r"SimpleNamespace resizes to "
     r"\{'longest_edge': 32\}; boxes are mapped for a shortest_edge or a height and width"),
    (dict(do_resize=True, size={"shortest_edge": 32, "longest_edge": 64}), "resizes to")])
def test_a_processor_the_map_does_not_know_is_refused(settings, message):
    from types import SimpleNamespace

    with pytest.raises(ValueError, match=message):
        processed_frame(SimpleNamespace(**settings), 64, 48)
