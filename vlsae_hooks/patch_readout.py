"""Per-patch word evidence: which image positions show which attribute or object word.

A ``PatchReadout`` is a logistic readout applied to every image position on its own: from the
standardised hidden state of one position at the input of decoder layer ``layer`` (0: the
embeddings, i.e. the projector's output where it sits in the sequence) to M units, each a word
that captions use, spelled by one or more tokens (synonyms and capitalised forms share a unit:
"square" and "box"). A unit is an attribute ("red") or an object ("star").

Why per patch: a bag of words pooled over the whole image cannot say which colour goes with which
shape, and a small object's evidence is diluted in the mean of several hundred positions. Read per
patch, "a red star" is shown where one patch shows both red and a star (``modes/grounding.py``).
Why raw states and not the concept space's codes: on the toy world a box-supervised per-patch
readout separates present objects from absent co-occurring partners with AUC 0.972 on the raw
states against 0.887 on the space's top-k codes at the same layer (the k winners of a patch drop
what it shows; docs/efficacy.md).

``supervision`` says what it was fitted on: "boxes" (a patch is positive for a unit when an
object naming it covers enough of the patch) or "captions" (multiple-instance learning: an
image is positive when its caption names the unit, its logit the max over its patches).
Stored as ``patch_readout.safetensors`` beside a space, or in a folder of its own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from vlsae_hooks.step_checks import non_finite_names
from vlsae_hooks.tensor_files import save_tensors_atomically

PATCH_READOUT_NAME = "patch_readout.safetensors"
SUPERVISIONS = ("boxes", "captions")
NO_TOKEN = -1
"""Padding of ``unit_token_ids``: a unit spelled by fewer tokens than the widest."""


class PatchReadout:
    """Per-position logistic readout of attribute and object words (see the module docstring).

    Plain tensors, not an ``nn.Module``: it rides beside a space without joining its state dict.
    """

    FILE = PATCH_READOUT_NAME
    TENSORS = ("weight", "bias", "mean", "std", "unit_token_ids", "is_attribute")
    KIND = "patch readout"
    HOW_TO_FIT = ("on the image positions' states with per-patch boxes or caption words, as "
                  "docs/steering.md describes (mode grounding)")
    """How it is fitted, in words, for error messages (the runtime names no command)."""

    def __init__(self, weight: Tensor, bias: Tensor, mean: Tensor, std: Tensor,
                 unit_token_ids: Tensor, is_attribute: Tensor, layer: int = 0,
                 supervision: str = "boxes") -> None:
        name = type(self).__name__
        if weight.dim() != 2:
            raise ValueError(f"{name}.weight must be [d, n_units], got {tuple(weight.shape)}")
        d, m = weight.shape
        for field, t, shape in (("bias", bias, (m,)), ("mean", mean, (d,)), ("std", std, (d,)),
                                ("is_attribute", is_attribute, (m,))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}.{field} has shape {tuple(t.shape)}, expected {shape}")
        broken = non_finite_names({"weight": weight, "bias": bias, "mean": mean, "std": std})
        if broken:
            raise ValueError(f"{name}.{broken[0]} holds nan/inf; refit it")
        if not bool((std > 0).all()):
            raise ValueError(f"{name}.std must be > 0 everywhere (the states' spread)")
        if unit_token_ids.dim() != 2 or unit_token_ids.shape[0] != m:
            raise ValueError(f"{name}.unit_token_ids must be [{m}, n_spellings], got "
                             f"{tuple(unit_token_ids.shape)}")
        self._check_token_ids(unit_token_ids.long())
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"{name}.layer must be a decoder layer index >= 0, got {layer!r}")
        if supervision not in SUPERVISIONS:
            raise ValueError(f"{name}.supervision must be one of {SUPERVISIONS}, "
                             f"got {supervision!r}")
        self.weight, self.bias, self.mean, self.std = weight, bias, mean, std
        self.unit_token_ids, self.is_attribute = unit_token_ids.long(), is_attribute.bool()
        self.layer, self.supervision = layer, supervision

    @staticmethod
    def _check_token_ids(ids: Tensor) -> None:
        """Every unit spelled by at least one token, padding only -1, no token in two places
        (a token's logit moves by its one unit's evidence)."""
        if bool((ids < NO_TOKEN).any()):
            raise ValueError(f"PatchReadout.unit_token_ids holds {int(ids.min())}: token ids "
                             "are >= 0, padding is -1")
        empty = (~(ids >= 0).any(1)).nonzero()[:, 0].tolist()
        if empty:
            raise ValueError(f"PatchReadout units {empty} are spelled by no token")
        used = ids[ids >= 0].tolist()
        if len(set(used)) != len(used):
            raise ValueError("PatchReadout.unit_token_ids must not name a token twice (a token "
                             "spells one unit)")

    @property
    def d(self) -> int:
        """Width of the states it reads."""
        return self.weight.shape[0]

    @property
    def n_units(self) -> int:
        return self.weight.shape[1]

    def to(self, device: torch.device | str) -> PatchReadout:
        """Move every tensor to ``device`` (in place); returns self."""
        for name in self.TENSORS:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def logits(self, states: Tensor, image_weight: float = 1.0) -> Tensor:
        """Float32 logits [..., M] of states [..., d]. ``image_weight`` scales the standardised
        states: 0 reads every position as the mean state, the evidence with no image."""
        standard = (states.to(self.mean.device, torch.float32) - self.mean) / self.std
        if image_weight != 1:
            standard = image_weight * standard
        return standard @ self.weight.float() + self.bias.float()

    def probs(self, states: Tensor) -> Tensor:
        """p_u(patch) [B, P, M] of the states [B, P, d] of P image positions."""
        return torch.sigmoid(self.logits(states))

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/<FILE>`` atomically (a temp file, then a rename); makes ``folder``."""
        path = Path(folder) / self.FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors_atomically({name: getattr(self, name).detach().contiguous().cpu()
                                 for name in self.TENSORS}, path,
                                metadata={"layer": str(self.layer),
                                          "supervision": self.supervision})
        return path

    @classmethod
    def load(cls, path: str | Path) -> PatchReadout:
        """The readout in ``path``: a folder holding ``<FILE>``, or the file itself."""
        path = Path(path)
        file_path = path / cls.FILE if path.is_dir() else path
        if not file_path.is_file():
            raise FileNotFoundError(f"{path} has no {cls.FILE} (its {cls.KIND}); fit one "
                                    f"{cls.HOW_TO_FIT}")
        try:
            with safe_open(str(file_path), "pt") as file:
                tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
                metadata = file.metadata() or {}
        except Exception as error:  # a truncated or foreign file
            raise ValueError(f"{file_path} is not a readable safetensors file ({error}); "
                             "refit it") from error
        missing = [name for name in cls.TENSORS if name not in tensors]
        missing += [key for key in ("layer", "supervision") if key not in metadata]
        if missing:
            raise ValueError(f"{file_path} lacks {missing}; refit it {cls.HOW_TO_FIT}")
        return cls(*(tensors[name] for name in cls.TENSORS), layer=int(metadata["layer"]),
                   supervision=metadata["supervision"])
