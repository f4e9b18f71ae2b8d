"""The map from an image's pixels to the frame its processor hands the vision tower, so that
a box (``box_data.py``) covers the patches that show it.

The processed frame (``FrameMap``) follows the image processor's own settings, in its order:
pad to a square (``LlavaImageProcessor`` with ``do_pad``), resize (``shortest_edge``, or a fixed
height and width), centre crop (``crop_size``; an image smaller than the crop is padded). llava-hf
LLaVA-1.5's processor resizes the shortest side to 336 and crops the centre 336 x 336, so on a
landscape image boxes lose their parts left and right of the centre square.
"""

from __future__ import annotations

from dataclasses import dataclass

from sae_training.box_data import Box


@dataclass(frozen=True)
class FrameMap:
    """Where an image's pixels land in the processed image: x' = scale_x x + offset_x, and
    alike for y; the processed image is ``width`` x ``height``."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    width: int
    height: int

    def box(self, box: Box) -> Box | None:
        """The box in the processed frame, cut to it; None if nothing of it is left."""
        x0, y0, x1, y1 = box
        x0, x1 = (min(max(self.scale_x * x + self.offset_x, 0.0), self.width) for x in (x0, x1))
        y0, y1 = (min(max(self.scale_y * y + self.offset_y, 0.0), self.height) for y in (y0, y1))
        return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _size_field(size: object, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def _pil_backend(image_processor) -> bool:
    """The PIL backends pad an image smaller than the crop by ceil(gap / 2) before it,
    torchvision's by floor(gap / 2)."""
    try:
        from transformers.image_processing_backends import PilBackend
    except ImportError:  # older transformers: the numpy/PIL processors
        return not type(image_processor).__name__.endswith("Fast")
    return isinstance(image_processor, PilBackend)


def processed_frame(image_processor, width: int, height: int) -> FrameMap:
    """The map of a ``width`` x ``height`` image into what ``image_processor`` makes of it
    (its pad to square, resize and centre crop, with its own rounding)."""
    name = type(image_processor).__name__
    scale_x = scale_y = 1.0
    offset_x = offset_y = 0.0
    w, h = width, height
    if getattr(image_processor, "do_pad", False):
        if not hasattr(image_processor, "pad_to_square"):
            raise ValueError(f"{name} pads images in a way this map does not know (only "
                             "LlavaImageProcessor's pad to a square is mapped)")
        side = max(w, h)
        offset_x, offset_y = (side - w) // 2, (side - h) // 2
        w = h = side
    if getattr(image_processor, "do_resize", False):
        size = image_processor.size
        shortest = _size_field(size, "shortest_edge")
        fixed = _size_field(size, "height"), _size_field(size, "width")
        if shortest and not _size_field(size, "longest_edge"):
            new_w, new_h = ((shortest, int(shortest * h / w)) if w <= h
                            else (int(shortest * w / h), shortest))
        elif fixed[0] and fixed[1]:
            new_h, new_w = fixed
        else:
            raise ValueError(f"{name} resizes to {size}; boxes are mapped for a shortest_edge "
                             "or a height and width resize")
        sx, sy = new_w / w, new_h / h
        scale_x, scale_y = scale_x * sx, scale_y * sy
        offset_x, offset_y = offset_x * sx, offset_y * sy
        w, h = new_w, new_h
    if getattr(image_processor, "do_center_crop", False):
        crop = image_processor.crop_size
        crop_h, crop_w = _size_field(crop, "height"), _size_field(crop, "width")
        pil = _pil_backend(image_processor)
        offset_x += _crop_offset(w, crop_w, pil)
        offset_y += _crop_offset(h, crop_h, pil)
        w, h = crop_w, crop_h
    return FrameMap(scale_x, scale_y, float(offset_x), float(offset_y), w, h)


def _crop_offset(size: int, crop: int, pil: bool) -> int:
    """Where pixel 0 of a ``size``-long side lands in its centre crop of ``crop``."""
    if size >= crop or pil:
        return -((size - crop) // 2)
    return (crop - size) // 2
