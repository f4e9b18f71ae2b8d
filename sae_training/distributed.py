"""accelerate set-up shared by extraction and training, the same on one device and many.

accelerate only builds a gloo process group over several CPU processes when told ``cpu=True``;
without it every process of ``torchrun`` / ``accelerate launch`` on a CUDA-less machine believes
it is alone, so they train unsynchronised copies and race on one checkpoint file.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
from torch import Tensor


def launched_on_cpu() -> bool:
    """True for a multi-process launch on a machine without CUDA."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(mixed_precision: str):
    """An ``Accelerator``; "auto" precision is bf16 on GPU and full precision on CPU."""
    from accelerate import Accelerator

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    return Accelerator(mixed_precision=mixed_precision, cpu=launched_on_cpu())


def make_state():
    """accelerate's ``PartialState`` (process index, count, device) for extraction."""
    from accelerate import PartialState

    return PartialState(cpu=launched_on_cpu())


def gather_across_processes(x: Tensor) -> Tensor:
    """Every process's rows, concatenated, with gradient back to this process's own rows.

    A contrastive loss over each process's shard alone would be a different loss (fewer
    negatives); over the gathered batch, DDP's averaged gradient equals the one-process one.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(dist_nn.all_gather(x.contiguous()))
