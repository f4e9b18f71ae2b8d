"""Boxes map into the processed frame exactly as the image processor maps the image: resize,
centre crop or pad, for the torchvision and PIL processors and LLaVA's padding one."""

import pytest
import torch
from PIL import Image, ImageDraw

from sae_training.box_data import FrameMap, processed_frame
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


@pytest.mark.parametrize("backend", ["torchvision", "pil", "llava_pad", "small_crop"])
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
