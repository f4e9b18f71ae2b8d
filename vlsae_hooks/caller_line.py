"""Warnings that name the user's line: the first frame outside the package, whichever entry
point and however many of the package's own frames led there."""

from __future__ import annotations

import os
import sys


def callers_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, counted from the function that calls this, of the first
    frame outside ``vlsae_hooks``: the caller's own line, whichever entry point (``load_space``,
    a class's ``from_pretrained``, ``save_pretrained``, ``attach``) led to the warning."""
    package = os.path.dirname(__file__) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level
