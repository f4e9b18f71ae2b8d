"""A model-free extractor for the extraction tests: each row says which sample it came from."""

from __future__ import annotations

import torch

from sae_training.extractors import Extractor
from sae_training.samples import Sample


class KeyRows(Extractor):
    """No model: a sample's rows are its key's number, in each of 4 columns (vision) and that
    plus 1 (text); small integers, exact in every dtype a shard may hold (``dtype``: the dtype
    the rows come out in, as a model's would)."""

    model_type, site, layer, d_model = "llava", "layer_input", 1, 4

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype

    def __call__(self, batch: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        vision = torch.tensor([[float(int(s.key))] * self.d_model for s in batch])
        return vision.to(self.dtype), (vision + 1).to(self.dtype)
