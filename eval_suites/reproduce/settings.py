"""The settings of one POPE or CHAIR protocol run (``RunSettings``): every one that can move a
number, checked when made, and refused when the method or decoding would ignore it (the report
would record it as if it had moved the numbers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sae_training.config import check_choice, check_positive
from vlsae_hooks.modes import mode_spec
from vlsae_hooks.placement import requested_device

from ..arguments import check_model
from .methods import LLAVA_V1_SYSTEM, METHOD_MODES, REALIGNMENT_MODES, RECOMMENDED

REFERENCE_SEED = 55
DECODINGS = ("sample", "greedy")
DTYPES = ("float16", "bfloat16", "float32")
"""``--dtype`` names: the torch dtypes a model is loaded in."""
SAMPLING_OPTIONS = ("temperature", "top_p")
"""Settings only sampling uses: a greedy run that is given one refuses it."""
STEERING_OPTIONS = ("space", "aux", "alpha", "image_weight", "contrast_weight",
                    "plausibility_cutoff", "layer", "site")
"""Settings only a steered method uses: a plain-model method that is given one refuses it."""
MODE_OPTIONS = ("alpha", "image_weight", "contrast_weight", "plausibility_cutoff", "layer", "site")
"""Settings that are ``attach`` options: a method whose mode has no such option refuses it."""
REFERENCE_STEERING = {"image_weight": 0.9, "contrast_weight": 0.6, "plausibility_cutoff": 0.8}
"""The reference's settings the realignment methods take where none is given (alpha is the
protocol's: ``POPE_ALPHA`` / ``CHAIR_ALPHA``)."""


@dataclass
class RunSettings:
    """One protocol run. Defaults are the reference's (sampling at T = 1, top_p = 1, seed 55,
    batch 1, LLaVA-1.5's system line, contrast_weight = 0.6, plausibility_cutoff = 0.8,
    image_weight = 0.9)."""

    model: str
    """Folder (or hub id already in the local cache) of a llava-hf model."""
    method: str
    """A key of ``METHOD_MODES``: regular | greedy | vlsae | vlsae-contrast | vlsae-shift |
    vlsae-reference | vlsae-evidence | vlsae-grounding."""
    max_new_tokens: int
    alpha: float | None
    """Shift strength (reference: 0.8 for POPE, 0.7 for CHAIR); None: not given (``vlsae`` and
    ``vlsae-evidence`` then take the space's recommendation or attach's default)."""
    space: str | None = None
    """A saved space folder or the reference's SAE .pth; None: the space shipped with the model."""
    aux: str | None = None
    """The reference's auxiliary .pt, with a LLaVA .pth ``space``."""
    decoding: str = "sample"
    """"sample" (the papers' protocol) or "greedy"; method "greedy" is always greedy and
    method "sample" always samples."""
    temperature: float | None = None
    """None: not given; a sampled run takes the reference's 1, a greedy one records None."""
    top_p: float | None = None
    """In (0, 1]; None as for ``temperature``."""
    num_beams: int = 1
    seed: int = REFERENCE_SEED
    """Seeds torch/numpy/random (``transformers.set_seed``) before each question file / run."""
    batch_size: int = 1
    """1 as in the reference; larger batches are faster but draw different random numbers."""
    system_prompt: str = LLAVA_V1_SYSTEM
    image_weight: float | None = None
    """None: not given; the realignment methods take the reference's 0.9 (``__post_init__``)."""
    contrast_weight: float | None = None
    plausibility_cutoff: float | None = None
    layer: int | None = None
    site: str | None = None
    dtype: str | None = None
    """torch dtype name; None: float16 on CUDA (as the reference loads LLaVA), else float32."""
    device: str | None = None
    """None: cuda if available, else cpu."""
    limit: int | None = None
    """Answer only the first ``limit`` items (per question file / of the image selection)."""
    load_in_4bit: bool = False
    """Quantize the weights to 4 bits with bitsandbytes (to fit a GPU; moves the numbers)."""
    device_map: str | None = None
    """``from_pretrained``'s device_map (e.g. "auto": spread over the GPUs and the CPU)."""

    def __post_init__(self) -> None:
        if self.method not in METHOD_MODES:
            raise ValueError(f"unknown method {self.method!r}; "
                             f"choose one of {sorted(METHOD_MODES)}")
        check_choice("RunSettings", "decoding", self.decoding, DECODINGS)
        check_model(self.model)
        if self.dtype is not None:
            check_choice("RunSettings", "dtype", self.dtype, DTYPES)
        check_positive("RunSettings", max_new_tokens=self.max_new_tokens,
                       num_beams=self.num_beams, batch_size=self.batch_size, limit=self.limit)
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.aux is not None and self.space is None:
            raise ValueError("--aux belongs to a reference .pth given with --space")
        self._refuse_unused()
        if not self.greedy():  # the reference's sampler, recorded as run
            self.temperature = 1.0 if self.temperature is None else self.temperature
            self.top_p = 1.0 if self.top_p is None else self.top_p
        mode = METHOD_MODES[self.method]
        if mode in REALIGNMENT_MODES:  # recorded as run, in the report
            for name, reference in REFERENCE_STEERING.items():
                if name in mode_spec(mode).option_names and getattr(self, name) is None:
                    setattr(self, name, reference)

    def _refuse_unused(self) -> None:
        """Refuse a setting this method or decoding would ignore: the report would record it as
        if it had moved the numbers."""
        mode = METHOD_MODES[self.method]
        if mode is None:
            given = [name for name in STEERING_OPTIONS if getattr(self, name) is not None]
            if given:
                raise ValueError(f"method {self.method!r} runs the plain model, unsteered: it "
                                 f"takes no {_flags(given)} or choose a vlsae method")
        elif mode != RECOMMENDED:  # vlsae: the options of the mode the space recommends
            given = [name for name in MODE_OPTIONS if getattr(self, name) is not None
                     and name not in mode_spec(mode).option_names]
            if given:
                raise ValueError(f"method {self.method!r} (mode {mode}) takes no "
                                 f"{_flags(given)} or choose a method that does")
        if self.greedy():
            given = [name for name in SAMPLING_OPTIONS if getattr(self, name) is not None]
            if given:
                raise ValueError(f"method {self.method!r} with decoding {self.decoding!r} "
                                 f"decodes greedily: it takes no {_flags(given)} "
                                 "or sample (--decoding sample, or method 'sample')")

    def greedy(self) -> bool:
        """Whether this run decodes greedily: method greedy, or decoding greedy unless the
        method is sample (which always samples)."""
        return self.method == "greedy" or (self.decoding == "greedy" and self.method != "sample")

    def generate_kwargs(self) -> dict:
        """``generate`` arguments. top_k = 0: the reference's sampler applies no top-k cut."""
        if self.greedy():
            kwargs: dict = {"do_sample": False}
        else:
            kwargs = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                      "top_k": 0}
        if self.num_beams > 1:
            kwargs["num_beams"] = self.num_beams
        return kwargs

    def steering(self) -> dict:
        """``attach`` options: those given (for the realignment methods, with the reference's
        defaults filled in), so ``vlsae`` keeps what the space recommends."""
        options = {"alpha": self.alpha, "image_weight": self.image_weight,
                   "contrast_weight": self.contrast_weight,
                   "plausibility_cutoff": self.plausibility_cutoff,
                   "layer": self.layer, "site": self.site}
        return {name: value for name, value in options.items() if value is not None}

    def resolve(self) -> None:
        """Fill in ``device`` / ``dtype``, so the report and the resume check have them."""
        self.device = str(requested_device(self.device))
        self.dtype = self.dtype or ("float16" if self.device.startswith("cuda") else "float32")

    def resume_key(self, **protocol) -> dict:
        """What answers depend on, compared before a run resumes. ``limit`` is in it only for
        batches of more than one: one at a time, the first items are answered the same whatever
        the limit, but batched, the items after a limit would be batched (and sampled) as no
        uninterrupted run batches them."""
        self.resolve()
        return {**{k: v for k, v in asdict(self).items()
                   if k != "limit" or self.batch_size > 1}, **protocol}


def _flags(names: list[str]) -> str:
    """Settings named as their command-line flags, which is how a user gave them, then what to
    do with them."""
    flags = ", ".join("--" + name.replace("_", "-") for name in names)
    return f"{flags}; drop {'it' if len(names) == 1 else 'them'}"
