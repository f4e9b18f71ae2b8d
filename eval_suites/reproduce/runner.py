"""What the POPE and CHAIR protocols share: loading the model and the concept space a run's
settings (``settings``) name, answering (image, prompt) items in batches, and the JSON + Markdown
report.

Everything that can move a number is a field of ``RunSettings`` and lands in the report, with
the space's config, the library versions and the device, so a result can be rerun as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
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

from sae_training.hub_kernels import offline_kernels
from vlsae_hooks import SteeringHandle, find_space, load_space
from vlsae_hooks.spaces import ConceptSpace

from ..core.decoder import HFDecoder
from .journal import AnswerLog, atomic_write
from .methods import METHOD_MODES, open_method
from .settings import RunSettings

log = logging.getLogger(__name__)


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
    log.info("settings %s", asdict(settings))
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
    log.info("results %s; wrote %s and %s", json.dumps(report["results"]), json_path, md_path)
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
