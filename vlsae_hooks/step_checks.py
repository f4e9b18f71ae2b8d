"""What a steered forward checks of its inputs: where its image came from, and nan/inf, blamed on
the image when the image holds it, else on the model."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def image_input(kwargs: dict) -> object:
    """A forward's image: pixel_values, or the image features ``generate`` encoded from them;
    None when the call has no image (a decoding step)."""
    if kwargs.get("pixel_values") is not None:
        return kwargs["pixel_values"]
    encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
    return getattr(encoded, "pooler_output", None)


def check_image_given(kwargs: dict, input_ids: Tensor | None, vision_ids: Tensor) -> None:
    """Refuse a prefill whose prompt holds image (or video) tokens but that brings no image or
    video: the model would put the image token's embedding where the image goes, and steering
    would read that as the image (one host read, at a prefill only)."""
    encoded = kwargs.get("mm_encoder_outputs") or {}
    if (input_ids is None or image_input(kwargs) is not None
            or any(encoded.get(kind) is not None for kind in ("image", "video"))
            or kwargs.get("pixel_values_videos") is not None):
        return
    if bool(torch.isin(input_ids, vision_ids.to(input_ids.device)).any()):
        raise ValueError(
            "the prompt holds image tokens but the call has no image (no pixel_values): "
            "steering would read the image token's embedding as the image. Pass the image's "
            "pixel_values with the prompt. To go on with a conversation, pass the cache the "
            "turn before returned (generate(..., cache=out.cache)); in mode 'reference', "
            "which keeps no cache (out.cache is None), pass the whole conversation again with "
            "its pixel_values")


def non_finite(images: object) -> bool:
    """Whether a tensor, or any tensor of a list of them, holds nan/inf."""
    if isinstance(images, Tensor):
        return not bool(torch.isfinite(images).all())
    return isinstance(images, (list, tuple)) and any(map(non_finite, images))


def non_finite_names(tensors: Mapping[str, Tensor]) -> list[str]:
    """The names of the floating-point ``tensors`` holding nan/inf, in order (weights read from
    a file, a readout's fields): corrupt values to refuse as they load, naming them."""
    return [name for name, tensor in tensors.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def check_finite(x: Tensor, rows: Tensor, what: str, site_layer: int,
                 image: object = None) -> None:
    """Raise on nan/inf in the used ``rows`` of ``x`` (one host sync), naming the rows and,
    when ``image`` (the call's image input) holds nan/inf, blaming it rather than the model.
    One bad row fails the whole call: the batch runs as one forward."""
    bad = ~torch.isfinite(x).all(dim=-1) & rows
    if not bool(bad.any()):
        return
    where = (f"batch row(s) {bad.nonzero()[:, 0].tolist()}: non-finite (nan/inf) {what} "
             f"positions at the input of decoder layer {site_layer}")
    if non_finite(image):
        raise FloatingPointError(f"{where}: the image input is non-finite (nan/inf in "
                                 "pixel_values, or in the image features encoded from "
                                 "them); check how the image was loaded and preprocessed")
    raise FloatingPointError(
        f"{where}: non-finite activations, the model itself overflowed (try float32 or "
        "bfloat16 instead of float16) and steering cannot proceed")


def check_image_vectors(vectors: Tensor, pixel_values: Tensor) -> None:
    """Refuse images [n_images, ...] whose pixels or vectors hold nan/inf (one host read, at a
    prefill), naming them, and blaming the pixels when they hold it (a vector can look finite
    while the model's own tower, fed the same pixels, turns them into nan)."""
    bad_pixels = ~torch.isfinite(pixel_values.flatten(1)).all(dim=-1)
    bad = bad_pixels | ~torch.isfinite(vectors.flatten(1)).all(dim=-1).to(bad_pixels.device)
    if not bool(bad.any()):
        return
    where = f"image(s) {bad.nonzero()[:, 0].tolist()}: non-finite (nan/inf)"
    if bool(bad_pixels.any()):
        raise FloatingPointError(f"{where} pixel values; check how the image was loaded and "
                                 "preprocessed")
    raise FloatingPointError(f"{where} image vectors: the space overflowed (try float32)")
