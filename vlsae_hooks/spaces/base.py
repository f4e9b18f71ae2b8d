"""The concept-space interface every space implements (VL-SAE now, LexVLA later).

A concept space maps a d_model-wide representation of either modality into a shared sparse
code of ``n_concepts`` entries and back. It is saved as ``model.safetensors`` + ``config.json``
so that the runtime can load it without the training code, and the config records which model
and which site it was trained at, so ``attach`` can refuse or warn on a mismatch. The steering
it recommends sits beside them in ``steering.json`` (as ``generation_config.json`` does for
generation). A space folder may also be a Hugging Face hub repo ("org/name"). The config is
``spaces.config``; the folder's files and the hub are ``spaces.folder``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from vlsae_hooks.spaces.config import SpaceConfig
from vlsae_hooks.spaces.folder import (
    CONFIG_NAME,
    LEGACY_STEERING_KEY,
    STEERING_NAME,
    WEIGHTS_NAME,
    adopt_legacy_steering,
    read_config,
    read_steering,
    space_folder,
)
from vlsae_hooks.spaces.fused_text import FusedTextDecoder
from vlsae_hooks.step_checks import non_finite_names
from vlsae_hooks.tensor_files import save_tensors

if TYPE_CHECKING:
    from vlsae_hooks.patch_readout import PatchReadout
    from vlsae_hooks.phrase_evidence import PhraseReadout
    from vlsae_hooks.spaces.vlsae import TextStepEncoder
    from vlsae_hooks.word_evidence import WordReadout


class ConceptSpace(nn.Module):
    """Abstract shared vision-language concept space.

    Subclasses set ``kind`` and implement ``encode``/``decode`` and ``_from_config``; saving,
    loading and validation live here so every space is stored the same way.
    """

    kind: ClassVar[str] = ""
    REPLACED_FILES: ClassVar[tuple[str, ...]] = (WEIGHTS_NAME, CONFIG_NAME, STEERING_NAME)
    """Files of a folder that ``save_pretrained`` replaces, or removes if the space has none."""
    HUB_FILES: ClassVar[tuple[str, ...]] = REPLACED_FILES
    """Files of a hub repo that ``push_to_hub`` replaces, or removes if the space has none (a
    repo's other files, its README and .gitattributes, stay)."""
    config: SpaceConfig

    def __init__(self) -> None:
        super().__init__()
        self.recommended_steering: dict = {}
        """``attach`` options tuned for this space (``steering.json`` beside it), the defaults
        of ``attach(model, space)``; {}: none."""
        self.refused_readouts: dict[str, str] = {}
        """Readouts that lay beside the space but were not loaded (attribute name, e.g.
        ``"word_readout"`` -> why: fitted on other weights, unreadable, another width); kept so
        that ``readout`` refuses a mode that reads one with that reason, while the others steer
        as if the file were not there."""

    def extra_repr(self) -> str:
        c = self.config
        return (f"model_name={c.model_name!r}, site={c.site!r}, layer={c.layer}, "
                f"n_concepts={c.n_concepts}, k={c.k}, "
                f"recommended_steering={self.recommended_steering}")

    def readout(self, name: str) -> WordReadout | PhraseReadout | PatchReadout | None:
        """The readout ``name`` (``"word_readout"``, ``"phrase_readout"``, ``"patch_readout"``)
        the space holds, None if it has none; one refused at load raises why (only the modes
        that read it need it refit)."""
        held = getattr(self, name, None)
        if held is None and name in self.refused_readouts:
            raise ValueError(self.refused_readouts[name])
        return held

    def encode(self, x: Tensor, modality: str) -> Tensor:
        """[..., d_model] -> dense [..., n_concepts] with exactly k non-zeros per row."""
        raise NotImplementedError

    def decode(self, z: Tensor, modality: str) -> Tensor:
        """Dense [..., n_concepts] -> [..., d_model] representation of ``modality``."""
        raise NotImplementedError

    def encode_sparse(self, x: Tensor, modality: str) -> tuple[Tensor, Tensor]:
        """(values [..., k], indices [..., k]) of the active concepts; spaces override this
        with a fast path, steering uses it so it never builds dense h-wide codes."""
        return self.encode(x, modality).topk(self.config.k, dim=-1)

    def decode_sparse(self, values: Tensor, indices: Tensor, modality: str) -> Tensor:
        """Decode a sparse code given as (values, indices); repeated indices add up."""
        dense = torch.zeros(*values.shape[:-1], self.config.n_concepts, dtype=values.dtype,
                            device=values.device).scatter_add_(-1, indices, values)
        return self.decode(dense, modality)

    def fused_text_decoder(self) -> FusedTextDecoder | None:
        """The text decode multiplied out for the per-step realignment (shift, contrast); None
        for a kind without one, whose realignment then goes through ``decode_sparse``."""
        return None

    def text_step_encoder(self) -> TextStepEncoder | None:
        """``encode_sparse(x, "text")`` with its tensors read once and its values scaled, the
        same to float rounding, for the per-step realignment; None for a kind without one (the
        realignment then calls ``encode_sparse``)."""
        return None

    @classmethod
    def _from_config(cls, config: SpaceConfig) -> ConceptSpace:
        """An untrained space with the shapes the config describes."""
        raise NotImplementedError

    def _write_files(self, folder: Path) -> None:
        """Write the space's files into ``folder`` (subclasses add theirs)."""
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        save_tensors(tensors, folder / WEIGHTS_NAME)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        if self.recommended_steering:
            (folder / STEERING_NAME).write_text(
                json.dumps(self.recommended_steering, indent=2) + "\n")

    def _restamp(self, staged: Path, path: Path) -> None:
        """Rewrite into ``staged`` the files of ``path`` that name the weights being replaced
        (subclasses: a readout's record of the space it was fitted on)."""

    def save_pretrained(self, path: str | Path) -> None:
        """Write the space into folder ``path``: model.safetensors, config.json and, when
        ``recommended_steering`` is set, steering.json (a stale one is removed).

        Atomic, so a failed save (full disk, an error mid-way) never leaves a half-written space
        that loads as garbage: every file is written in full into a hidden temporary folder
        inside ``path`` (same file system, even where ``path`` is a link), then renamed into
        place, config.json last; on failure the previous space is left as it was. Other files
        in ``path`` stay (metrics.json, a README, readouts this space does not hold: refit those
        if the weights changed).
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; a space is saved as a folder of files: "
                                     "give a folder's path")
        adopt_legacy_steering(self, "the space's config")
        path.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=".saving-", dir=path))
        try:
            self._write_files(staged)
            self._restamp(staged, path)
            for name in self.REPLACED_FILES:
                if not (staged / name).exists():
                    (path / name).unlink(missing_ok=True)
            for file in sorted(staged.iterdir(), key=lambda f: f.name == CONFIG_NAME):
                os.replace(file, path / file.name)
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload concept space",
                    private: bool | None = None, revision: str | None = None,
                    token: str | None = None) -> str:
        """Upload the space, as ``save_pretrained`` writes it, to hub repo ``repo_id`` (created
        if missing; ``revision``: a branch, created too), in one commit that also removes the
        space files of an earlier push that this space lacks (``HUB_FILES``: a recommendation
        or readouts that would otherwise load with these weights). Returns the commit's URL;
        ``load_space(repo_id)`` loads it back."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                       commit_message=commit_message,
                                       delete_patterns=list(self.HUB_FILES))
        return commit.commit_url

    @classmethod
    def from_pretrained(cls, path: str | Path, *, revision: str | None = None) -> ConceptSpace:
        """Load a saved space (a folder, or a hub repo id with an optional ``revision``),
        checking its files, kind, tensor shapes and values against the config.

        Called on ``ConceptSpace`` itself it loads any kind, like ``load_space``.
        """
        if not cls.kind:
            from vlsae_hooks.spaces import load_space

            return load_space(path, revision=revision)
        path = space_folder(path, revision)
        config = read_config(path)
        if config.kind != cls.kind:
            raise ValueError(f"{path} holds a {config.kind!r} space, not a {cls.kind!r} space; "
                             "use vlsae_hooks.load_space(path) to load any kind")
        weights_file = path / WEIGHTS_NAME
        if not weights_file.is_file():
            raise FileNotFoundError(f"concept space at {str(path)!r} lacks {WEIGHTS_NAME}")
        steering = read_steering(path)
        if steering and LEGACY_STEERING_KEY in config.extra:
            raise ValueError(f"{path} recommends steering twice, in {STEERING_NAME} and in "
                             f"{CONFIG_NAME}'s extra.{LEGACY_STEERING_KEY}; delete the latter")
        space = cls._from_config(config)
        try:
            state = load_file(str(weights_file))
        except Exception as error:  # a truncated or foreign file; safetensors' own error type
            raise ValueError(f"{weights_file} is not a readable safetensors file ({error}): the "
                             "space is damaged; re-convert or re-train it") from error
        expected = space.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{weights_file} does not match its config "
                             f"(missing {missing}, unexpected {unexpected})")
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(f"{weights_file}: {name} has shape {tuple(tensor.shape)}, "
                                 f"config implies {tuple(expected[name].shape)}")
        broken = non_finite_names(state)
        if broken:
            raise ValueError(f"{weights_file} holds NaN or inf in {broken}: the space is "
                             "corrupt (a diverged training run?); re-train or re-convert it")
        space.load_state_dict(state)
        space.recommended_steering = steering
        adopt_legacy_steering(space, str(path / CONFIG_NAME))
        dtype = next(iter(state.values())).dtype
        return space.to(dtype).eval()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
