"""Which image each row of a call shows, and the wrong-image control's pick of another row's.

``generate`` encodes one image per image in the prompts, then expands the rows (beams, several
return sequences): the rows of one prompt share its image, and a row without image tokens shows
none. Read at a prefill only (its host reads are the prefill's, never a decoding step's)."""

from __future__ import annotations

import torch
from torch import Tensor


def other_rows(rows: Tensor, has_image: Tensor | None = None) -> Tensor:
    """For each row of ``rows`` [B, ...] (pixels, or what an image gave at the site), the next
    row, cyclically, that shows an image and differs from it: beams of one prompt are skipped, so
    the control never steers a row with its own image, and a row without an image (``has_image``
    [B] False; None: every row shows one) is never another row's image. A row without an image
    keeps its own (nothing steers it). Raises if a row with an image has no other to take."""
    flat = rows.reshape(len(rows), -1)
    n = len(flat)
    shows = (torch.ones(n, dtype=torch.bool, device=flat.device) if has_image is None
             else has_image.to(flat.device))
    differs = (flat[:, None, :] != flat[None, :, :]).any(-1) & shows[None, :]  # [B, B]
    order = (torch.arange(n)[:, None] + torch.arange(1, n + 1)[None, :]) % n  # candidates by row
    hit = differs.gather(1, order.to(differs.device))
    if not bool((hit.any(1) | ~shows).all()):
        raise ValueError("image_source='other' needs a batch with at least two different images")
    pick = order.to(hit.device).gather(1, hit.float().argmax(1, keepdim=True))[:, 0]
    return torch.where(shows, pick, torch.arange(n, device=pick.device))


def image_of_rows(input_ids: Tensor, image_token_ids: Tensor, n_images: int,
                  tokens_per_image: int | None) -> Tensor:
    """[B] long: which of the ``n_images`` images encoded for a call (in prompt order) each row
    shows, -1 for a row without image tokens. Every row with image tokens must show exactly one
    image (``tokens_per_image`` of them, when the model says how many), and the rows with an
    image must be a whole number of copies of each image (one per beam / return sequence)."""
    counts = torch.isin(input_ids, image_token_ids.to(input_ids.device)).sum(-1).tolist()
    shown = [row for row, count in enumerate(counts) if count]
    several = [row for row in shown if tokens_per_image and counts[row] != tokens_per_image]
    if several:
        raise ValueError(f"rows {several} hold {counts[several[0]]} image tokens where one image "
                         f"gives {tokens_per_image}: this steering reads one image per prompt")
    if not shown or len(shown) % n_images:
        raise ValueError(f"{n_images} images for {len(shown)} prompt rows with image tokens: "
                         "this steering needs one image per prompt")
    index = torch.full((len(counts),), -1, dtype=torch.long)
    index[shown] = torch.arange(len(shown)) // (len(shown) // n_images)
    return index
