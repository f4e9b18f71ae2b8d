"""What the POPE and CHAIR protocols share: the settings of a run, loading the model and the
concept space, answering (image, prompt) items in batches, and the JSON + Markdown report.

Everything that can move a number is a field of ``RunSettings`` and lands in the report, with
the space's config, the library versions and the device, so a result can be rerun as it was.
"""

from __future__ import annotations

import contextlib
import json
import platform
from collections.abc import Callable, Hashable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    BitsAndBytesConfig,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from sae_training.config import check_choice, check_positive
from sae_training.hub_kernels import offline_kernels
from vlsae_hooks import SteeringHandle, find_space, load_space
from vlsae_hooks.modes import mode_spec
from vlsae_hooks.placement import requested_device
from vlsae_hooks.spaces import ConceptSpace

from ..arguments import check_model
from ..core.decoder import HFDecoder
from .journal import AnswerLog, atomic_write
from .methods import (
    LLAVA_V1_SYSTEM,
    METHOD_MODES,
    REALIGNMENT_MODES,
    RECOMMENDED,
    open_method,
)

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


def load_vlm(settings: RunSettings):
    """(model, processor); fills in ``settings.device`` / ``dtype`` so the report has them."""
    settings.resolve()
    dtype = getattr(torch, settings.dtype)
    kwargs: dict = {"dtype": dtype}
    if settings.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True,
                                                           bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": settings.device}  # quantized weights cannot move later
    if settings.device_map is not None:
        kwargs["device_map"] = settings.device_map
    model_type = AutoConfig.from_pretrained(settings.model).model_type
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(f"--model {settings.model} is a {model_type!r} model, not a "
                         "vision-language one: the protocols run a llava-hf LLaVA-1.5 / "
                         "LLaVA-NeXT or Qwen2.5-VL folder or hub id")
    model = AutoModelForImageTextToText.from_pretrained(settings.model, **offline_kernels(kwargs))
    if "device_map" not in kwargs:
        model = model.to(settings.device)
    return model.eval(), AutoProcessor.from_pretrained(settings.model)


def load_run_space(settings: RunSettings, model) -> ConceptSpace | None:
    """The space a steered method uses: ``settings.space`` (a folder, or a reference .pth placed
    at the reference's depth in this model), else the one shipped with the model."""
    if METHOD_MODES[settings.method] is None:
        return None
    if settings.space is None:
        found = find_space(model)
        if found is None:
            raise ValueError(f"method {settings.method!r} needs a concept space: pass --space "
                             "(a saved space folder, or the reference's .pth with --aux)")
        return load_space(found)
    if Path(settings.space).is_file():
        depth = model.config.get_text_config().num_hidden_layers
        return load_space(settings.space, settings.aux, n_layers=depth)
    return load_space(settings.space, settings.aux)


@dataclass
class Run:
    """An open run: the decoder with its steering attached, and the cost so far."""

    decoder: HFDecoder
    space: ConceptSpace | None
    batch_size: int
    handle: SteeringHandle | None = None
    """The method's steering (None for the plain model)."""
    logs: list[AnswerLog] = field(default_factory=list)
    example_prompt: str = ""

    def answer(self, log: AnswerLog, ids: list[Hashable], items: list[tuple[Path, str]],
               row: Callable[[int, str, int], dict], max_new_tokens: int,
               desc: str) -> list[dict]:
        """The logged row of each (image file, prompt): those ``log`` holds are read back, the
        others generated ``batch_size`` at a time and made into rows by ``row(index, text,
        generated tokens)``, each batch appended to the log as it comes."""
        if items and not self.example_prompt:
            self.example_prompt = self.decoder.render(items[0][1])
        self.logs.append(log)

        def generate(batch: list[int]) -> list[dict]:
            images = [Image.open(items[i][0]).convert("RGB") for i in batch]
            answers = self.decoder.generate(images, [items[i][1] for i in batch], max_new_tokens)
            return [row(i, text, n) for i, (text, n) in zip(batch, answers)]

        return log.answer(ids, self.batch_size, generate, desc)

    def record(self, settings: RunSettings) -> dict:
        """Settings, space, steering site, environment and cost (over every run that added
        to the logs), for the report."""
        handle = self.handle
        return {
            "settings": asdict(settings),
            "generate_kwargs": settings.generate_kwargs(),
            "space": self.space.config.to_dict() if self.space is not None else None,
            "steered_layer_input": handle.site_layer if handle is not None else None,
            "example_prompt": self.example_prompt,
            "environment": environment(settings.device),
            "seconds_generating": sum(log.seconds for log in self.logs),
            "generated_tokens": sum(log.tokens for log in self.logs),
        }


@contextlib.contextmanager
def open_run(settings: RunSettings) -> Iterator[Run]:
    """Load the model and space, attach the method's steering, and close it all afterwards."""
    model, processor = load_vlm(settings)
    space = load_run_space(settings, model)
    decoder = HFDecoder(model, processor, settings.system_prompt, **settings.generate_kwargs())
    with open_method(decoder, settings.method, space, **settings.steering()) as handle:
        yield Run(decoder, space, settings.batch_size, handle)


def environment(device: str | None) -> dict:
    """Library versions and the device, which also move sampled numbers."""
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": device}
    if device and device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def write_report(out: Path, name: str, report: dict, markdown: str) -> tuple[Path, Path]:
    """``out/<name>.json`` and ``out/<name>.md``, each written whole or not at all; returns
    both paths."""
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    atomic_write(json_path, json.dumps(report, indent=2) + "\n")
    atomic_write(md_path, markdown)
    return json_path, md_path


def settings_markdown(report: dict) -> str:
    """The settings block every Markdown report ends with."""
    lines = ["", "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | `{value}` |" for key, value in report["settings"].items()
              if key != "system_prompt"]
    lines += [f"| generate | `{report['generate_kwargs']}` |",
              f"| steered at | input of decoder layer {report['steered_layer_input']} |"
              if report["steered_layer_input"] is not None else "| steered at | - |",
              f"| environment | `{report['environment']}` |",
              f"| time | {report['seconds_generating']:.1f} s for "
              f"{report['generated_tokens']} tokens |",
              "", "Prompt as the model saw it (first item):", "", "```",
              report["example_prompt"], "```", ""]
    return "\n".join(lines)
