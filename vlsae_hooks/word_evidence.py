"""Word evidence from the image's concepts: a learned map from a sparse concept code to the
caption words (tokens) it predicts, used to steer the next-token logits.

Why not decode the concepts back through the language model (D_t, then the LM head)? Concepts
learned where two objects co-occur encode them together, so the decoded text carries the absent
partner along (measured on the toy world: ``docs/efficacy.md``). A readout fitted to predict
which words an image's caption contains, from that image's concept code, learns instead which
words the concepts actually show.

``WordReadout`` holds, for M caption tokens: a concept-major weight [h, M], a bias [M], the token
ids [M] and the log of each token's base rate in captions [M]. The evidence against token w for
an image with code z is ``min(0, log sigmoid(z W + b)_w - log prior_w)``: zero for words the
image makes at least as likely as usual, negative (in nats) for words it makes less likely. It is
stored beside the space as ``word_readout.safetensors``.

``pool`` says which code of an image the readout was fitted on, and so reads at decode time:
"mean", the code of the mean image state (what the space itself encodes), "max", the
element-wise max of the codes of every image position, or "max_scores", the element-wise max
over the image positions of every concept's score (the cosine the top-k is taken on, dense). The
max keeps what single patches show (one small object) that the mean of several hundred positions
dilutes; on the toy world it reads absent partners from the image better, and the dense scores
keep which shape a patch shows, which its k winners mostly drop (docs/efficacy.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor

from vlsae_hooks.step_checks import non_finite_names
from vlsae_hooks.tensor_files import save_tensors_atomically

READOUT_NAME = "word_readout.safetensors"
POOLS = ("mean", "max", "max_scores")
SPACE_WEIGHTS = "model.safetensors"
"""The space's weights file (``spaces.folder.WEIGHTS_NAME``; importing it here would be
circular)."""
FINGERPRINT = "space_sha256"
"""Field of a readout's json (its fit's metrics) naming the space weights it was fitted on."""


def space_fingerprint(folder: str | Path) -> str:
    """sha256 of a space's weights: a readout fitted on other weights (a space retrained into the
    same folder) would read concepts that now mean something else."""
    with open(Path(folder) / SPACE_WEIGHTS, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


class WordReadout:
    """Logistic readout from concept codes to caption tokens (see the module docstring).

    Plain tensors, not an ``nn.Module``: it rides beside a space without joining its state dict.
    """

    FILE = READOUT_NAME
    TENSORS = ("weight", "bias", "token_ids", "log_prior")
    KIND = "word readout"
    HOW_TO_FIT = ("on the pooled concept codes of image-caption pairs, as docs/steering.md "
                  "describes (mode evidence)")
    """How this kind is fitted, in words, for error messages (the runtime names no command)."""
    UNRECORDED_POOL: str | None = "mean"
    """The pool of a file that records none (written before the pool was recorded); None: such
    a file is not one of this kind's."""

    def __init__(self, weight: Tensor, bias: Tensor, token_ids: Tensor, log_prior: Tensor,
                 pool: str = "mean") -> None:
        name = type(self).__name__
        if weight.dim() != 2:
            raise ValueError(f"{name}.weight must be [n_concepts, n_tokens], "
                             f"got {tuple(weight.shape)}")
        m = weight.shape[1]
        for field, t in (("bias", bias), ("token_ids", token_ids), ("log_prior", log_prior)):
            if t.shape != (m,):
                raise ValueError(f"{name}.{field} has shape {tuple(t.shape)}, expected ({m},)")
        if pool not in POOLS:
            raise ValueError(f"{name}.pool must be one of {POOLS}, got {pool!r}")
        broken = non_finite_names({"weight": weight, "bias": bias, "log_prior": log_prior})
        if broken:  # it would put nan in every steered logit
            raise ValueError(f"{name}.{broken[0]} holds nan/inf; refit it")
        self.weight, self.bias, self.log_prior, self.pool = weight, bias, log_prior, pool
        self.token_ids = token_ids.long()
        self._check_unique()

    def _check_unique(self) -> None:
        if len(set(self.token_ids.tolist())) != len(self.token_ids):
            raise ValueError("WordReadout.token_ids must not repeat a token")

    def to(self, device: torch.device | str) -> WordReadout:
        """Move every tensor to ``device`` (in place); returns self."""
        for name in self.TENSORS:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def select(self, keep: Tensor) -> WordReadout:
        """The readout of the ``keep`` [M] (bool) outputs only."""
        return type(self)(*(getattr(self, name)[..., keep] for name in self.TENSORS),
                          pool=self.pool)

    @property
    def n_concepts(self) -> int:
        return self.weight.shape[0]

    def check_width(self, n_concepts: int, where: str | None = None,
                    how_to_fit: str | None = None) -> None:
        """Refuse to read a space of ``n_concepts`` concepts when fitted for another: it would
        fail at the first step, or read the wrong rows. ``where``: the file, for the message;
        ``how_to_fit``: its advice (default ``HOW_TO_FIT``)."""
        if self.n_concepts != n_concepts:
            raise ValueError(f"{where or 'the ' + self.KIND} reads {self.n_concepts} concepts "
                             f"but the space has {n_concepts}: it was fitted for another "
                             f"space; refit it {how_to_fit or self.HOW_TO_FIT}")

    def logits(self, values: Tensor, indices: Tensor) -> Tensor:
        """Readout logits [B, M] of sparse codes (values, indices) [B, n]; cost n*M per row."""
        rows = self.weight[indices.to(self.weight.device)]  # [B, n, M]
        return torch.einsum("bn,bnm->bm", values.to(rows.dtype), rows) + self.bias

    def log_ratio(self, values: Tensor, indices: Tensor) -> Tensor:
        """``log p(w | code) - log prior_w`` in float32 [B, M]: > 0 where the image shows w."""
        return self._log_ratio(self.logits(values, indices))

    def _log_ratio(self, logits: Tensor) -> Tensor:
        return F.logsigmoid(logits.float()) - self.log_prior.float()

    def logits_dense(self, codes: Tensor) -> Tensor:
        """Readout logits [B, M] of dense codes [B, h], e.g. pooled ones, whose nonzeros are
        too many to gather weight rows for."""
        return codes.to(self.weight.device, self.weight.dtype) @ self.weight + self.bias

    def log_ratio_dense(self, codes: Tensor) -> Tensor:
        """``log_ratio`` of dense codes [B, h]."""
        return self._log_ratio(self.logits_dense(codes))

    def evidence(self, values: Tensor, indices: Tensor) -> Tensor:
        """``min(0, log p(w | code) - log prior_w)`` in float32 [B, M]: only evidence against."""
        return self.log_ratio(values, indices).clamp(max=0)

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/<FILE>`` atomically (a temp file, then a rename)."""
        path = Path(folder) / self.FILE
        save_tensors_atomically({name: getattr(self, name).detach().contiguous().cpu()
                                 for name in self.TENSORS}, path, metadata={"pool": self.pool})
        return path

    @classmethod
    def load(cls, folder: str | Path, n_concepts: int | None = None, *,
             space_folder: str | Path | None = None, how_to_fit: str | None = None
             ) -> WordReadout:
        """Load ``folder/<FILE>``; ``n_concepts`` checks it fits the space.

        A readout beside its space (``space_folder`` None) without a json, or whose json records
        no fingerprint, was written before they were recorded and is trusted; one kept apart
        from its space (``space_folder``) must name that space's weights in its json, since
        nothing else ties the two. ``how_to_fit``: what a refusal advises (default
        ``HOW_TO_FIT``, which names no command)."""
        folder = Path(folder)
        path, advice = folder / cls.FILE, how_to_fit or cls.HOW_TO_FIT
        if not path.is_file():
            where = "" if how_to_fit else "beside the space "
            raise FileNotFoundError(f"{folder} has no {cls.FILE} (its {cls.KIND}); fit one "
                                    f"{where}{advice}")
        try:
            with safe_open(str(path), "pt") as file:
                tensors = {name: file.get_tensor(name) for name in file.keys()}
                metadata = file.metadata() or {}
        except Exception as error:  # a truncated or foreign file
            raise ValueError(f"{path} is not a readable safetensors file ({error}); "
                             f"refit it {advice}") from error
        missing = [name for name in cls.TENSORS if name not in tensors]
        if missing:
            raise ValueError(f"{path} lacks {missing}; refit it {advice}")
        pool = metadata.get("pool", cls.UNRECORDED_POOL)
        if pool is None:
            raise ValueError(f"{path} does not record the pool it was fitted on (its 'pool' "
                             f"metadata); refit it {advice}")
        try:
            readout = cls(*(tensors[name] for name in cls.TENSORS), pool=pool)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
        if n_concepts is not None:
            readout.check_width(n_concepts, str(path), how_to_fit)
        cls._check_fingerprint(folder, space_folder, advice)
        return readout

    @classmethod
    def _check_fingerprint(cls, folder: Path, space_folder: str | Path | None,
                           advice: str) -> None:
        """Refuse a readout whose json names other space weights than ``space_folder``'s
        (None: ``folder``'s, and a readout without a json or fingerprint is trusted)."""
        info = folder / Path(cls.FILE).with_suffix(".json").name
        expected = json.loads(info.read_text()).get(FINGERPRINT) if info.is_file() else None
        if expected is None and space_folder is not None:
            raise FileNotFoundError(f"{folder} has no {info.name} naming the space weights "
                                    f"{folder / cls.FILE} was fitted on ('{FINGERPRINT}'); "
                                    f"refit it {advice}")
        space_folder = folder if space_folder is None else Path(space_folder)
        if expected is not None and expected != space_fingerprint(space_folder):
            raise ValueError(f"{folder / cls.FILE} was fitted on other weights than "
                             f"{space_folder / SPACE_WEIGHTS} (the space was retrained since, "
                             f"per {info.name}); refit it {advice}")


def check_token_ids(token_ids: Tensor, vocab_size: int, what: str) -> None:
    """Raise if ``token_ids`` name a token outside the model's vocabulary, negative ids included
    (checked once, at attach, not on every decoding step)."""
    if not len(token_ids):
        return
    low, high = int(token_ids.min()), int(token_ids.max())
    if low < 0:
        raise ValueError(f"{what} names token id {low}: token ids are >= 0")
    if high >= vocab_size:
        raise ValueError(f"{what} names token id {high} but the model's vocabulary has "
                         f"{vocab_size} tokens: it was fitted with another tokenizer")


def add_token_moves(logits: Tensor, moves: Tensor, token_ids: Tensor, rows: Tensor) -> Tensor:
    """``logits`` [B, T, V] with ``moves`` [B, M] (logits, already scaled) added at ``token_ids``
    on the positions ``rows`` [B, T] (bool); every other logit untouched. Returns a new tensor."""
    delta = (moves.to(logits.device, logits.dtype)[:, None, :]
             * rows[..., None].to(logits.device, logits.dtype))
    return logits.index_add(-1, token_ids.to(logits.device), delta)
