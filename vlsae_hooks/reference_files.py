"""Reading the VL-SAE authors' released files: plain ``torch.save`` state dicts, which may come
from anywhere, so they are read with ``torch.load(weights_only=True)`` only (never a full
unpickle, which could run code) and refused, with what to do, when they are not a flat dict of
finite tensors with exactly the expected names and shapes.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from vlsae_hooks.step_checks import non_finite_names

_SAFETENSORS_HINT = ("it looks like a safetensors file; a space saved by vlsae_hooks is loaded "
                     "from its folder (model.safetensors + config.json), not from the file")


def _is_safetensors(head: bytes) -> bool:
    """safetensors: 8-byte little-endian header length, then a JSON header starting with '{'."""
    return len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 32


def _load_failure(err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in the library's words: torch's advice to
    unpickle in full is not ours, and the unpickler's bare key or opcode on bytes that are no
    pickle at all says nothing to a user."""
    message = str(err).strip()
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if refused:
        return f"it holds objects other than tensors: {refused[1]}"
    if isinstance(err, EOFError):  # the unpickler ran out of bytes
        return "it is empty or cut short"
    if message.startswith("Weights only load failed") or isinstance(err, (KeyError, IndexError)):
        return "it is not a torch.save file"  # IndexError: an opcode popped an empty stack
    return message.splitlines()[0] if message else type(err).__name__


def read_state_dict(path: str | Path, what: str) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` from a ``torch.save`` file, with ``weights_only=True``.

    ``what`` names the file in errors ("SAE", "auxiliary"). Zip-format files are memory-mapped
    so the 1.6 GB LLaVA SAE is not read twice.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} weights {str(path)!r} is a directory; expected the reference's "
                         "torch.save file (.pth / .pt)")
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights {str(path)!r} do not exist")
    with open(path, "rb") as f:
        head = f.read(16)
    if _is_safetensors(head):
        raise ValueError(f"{path} is not a reference torch.save file: {_SAFETENSORS_HINT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True,
                           mmap=head.startswith(b"PK\x03\x04"))
    except Exception as err:  # any bytes may come in: every way of failing gets the message
        raise ValueError(f"{path} is not a plain tensor state dict that torch.load(weights_only="
                         f"True) can read ({_load_failure(err)}); only the reference's released "
                         "state dicts are supported, full pickles are never unpickled") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict "
                         f"(name -> tensor)")
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise ValueError(f"{path} is not a flat state dict: entries {not_tensors} are not tensors")
    broken = sorted(map(str, non_finite_names(state)))
    if broken:
        raise ValueError(f"{path} holds NaN or inf in {broken}: the {what} weights are "
                         "corrupt; download them again")
    return dict(state)


def check_keys(state: dict[str, Tensor], expected: tuple[str, ...], path: Path,
               what: str) -> None:
    """Refuse ``state`` unless its names are exactly ``expected`` (``what``: "SAE",
    "auxiliary"), listing the missing and the unexpected ones."""
    missing = [k for k in expected if k not in state]
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} is not a reference VL-SAE {what} file: "
                         + (f"missing keys {missing}" if missing else "")
                         + ("; " if missing and unexpected else "")
                         + (f"unexpected keys {unexpected}" if unexpected else "")
                         + f" (expected exactly {list(expected)})")


def check_shapes(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], path: Path,
                 reason: str) -> None:
    """Refuse ``state`` unless each of ``expected``'s tensors has its shape; ``reason`` says
    what implies them (the SAE's encoder, for the auxiliary file the SAE)."""
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{path}: {name} has shape {tuple(state[name].shape)}, but {reason} "
                             f"implies {shape}")
