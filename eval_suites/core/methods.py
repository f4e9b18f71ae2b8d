"""The one registry of decoding methods: a name -> a factory that opens a ``Decoder``.

A method is ``factory(model, processor)``, a context manager that puts the method's hooks on the
model (if any) and yields the decoder to answer with; leaving it takes the hooks off. Modules
that define methods call ``register_method`` when imported (the peers in
``eval_suites.peers.methods``, the toy world's in its own modules), so a frontend imports the
modules whose methods it offers and looks them up here. ``greedy`` and ``sample``, the plain
model's two baselines, are registered by this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

from transformers import AutoProcessor, PreTrainedModel

from .decoder import Decoder, HFDecoder

MethodFactory = Callable[[PreTrainedModel, AutoProcessor], AbstractContextManager[Decoder]]
METHODS: dict[str, MethodFactory] = {}
"""Every registered method, in the order registered (``greedy`` first)."""

SAMPLING: dict = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
"""Plain T = 1 sampling: no top-k or nucleus cut, so any gain is the method's, not a cutoff's."""


def register_method(name: str, factory: MethodFactory) -> None:
    """Make ``name`` available to every frontend that looks methods up here."""
    METHODS[name] = factory


def get_method(name: str) -> MethodFactory:
    """The factory registered as ``name``; the error lists what is registered."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


@contextlib.contextmanager
def greedy(model, processor) -> Iterator[Decoder]:
    """The plain model, greedy: the baseline every method is compared with."""
    yield HFDecoder(model, processor, do_sample=False)


@contextlib.contextmanager
def sample(model, processor) -> Iterator[Decoder]:
    """The plain model at T = 1, so a greedy table can carry the sampling baseline too."""
    yield HFDecoder(model, processor, **SAMPLING)


register_method("greedy", greedy)
register_method("sample", sample)
