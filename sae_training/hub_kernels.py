"""Loading a model on a GPU without the Hub: transformers (5.2x on) kernelizes a model it loads
on a GPU by default, fetching kernels (``kernels-community/activation``, ...) from the Hub, and
under ``HF_HUB_OFFLINE=1`` it fails in ``from_pretrained`` when they are not cached. Every loader
of ours passes its ``from_pretrained`` arguments through ``offline_kernels``."""

from __future__ import annotations

import logging
import os

from huggingface_hub import constants

log = logging.getLogger(__name__)


def offline_kernels(kwargs: dict) -> dict:
    """``kwargs`` with ``use_kernels=False`` added when the Hub is off and nobody chose: not the
    caller (``use_kernels`` in ``kwargs``) nor the environment (``USE_HUB_KERNELS``, which
    transformers reads; set it to 1 to use kernels you have cached)."""
    if not constants.HF_HUB_OFFLINE or "use_kernels" in kwargs or "USE_HUB_KERNELS" in os.environ:
        return kwargs
    log.info("HF_HUB_OFFLINE=1: loading without the Hub's kernels (use_kernels=False); set "
             "USE_HUB_KERNELS=1 to use kernels already in the cache")
    return {**kwargs, "use_kernels": False}
