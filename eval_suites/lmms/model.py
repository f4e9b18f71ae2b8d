"""``--model vlsae_llava``: a llava-hf (or Qwen2.5-VL) model under one of our decoding methods.

    lmms-eval --model vlsae_llava \
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=vlsae,space=PATH,alpha=0.8 \
        --tasks pope,coco_cap_chair --batch_size 8

Batched, left-padded ``generate``; the task's generation arguments (max_new_tokens, temperature,
do_sample, top_p, num_beams, until) are honoured; results come back in request order.
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from .methods import LMMS_METHODS

PASS_THROUGH = ("top_k", "repetition_penalty", "length_penalty", "no_repeat_ngram_size")
"""Task generation arguments handed to ``generate`` unchanged."""
IMAGE_PLACEHOLDER = "<image>"


def generate_kwargs(task_kwargs: dict) -> tuple[dict, list[str]]:
    """lmms-eval generation arguments -> (``generate`` kwargs, stop strings).

    lmms-eval's convention: temperature 0 means greedy whatever ``do_sample`` says."""
    task_kwargs = dict(task_kwargs)
    until = task_kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(task_kwargs.get("temperature") or 0.0)
    do_sample = bool(task_kwargs.get("do_sample", temperature > 0)) and temperature > 0
    kwargs = {"max_new_tokens": int(task_kwargs.get("max_new_tokens", 256)), "do_sample": do_sample,
              "num_beams": int(task_kwargs.get("num_beams") or 1)}
    if do_sample:
        kwargs["temperature"] = temperature
        top_p = task_kwargs.get("top_p")
        if top_p is not None and 0 < float(top_p) < 1:
            kwargs["top_p"] = float(top_p)
    kwargs.update({k: task_kwargs[k] for k in PASS_THROUGH if task_kwargs.get(k) is not None})
    return kwargs, until


def cut_at_stops(text: str, until: list[str]) -> str:
    """The text before the first stop string (lmms-eval's ``until``)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class VLSAELlava(lmms):
    """lmms-eval model: ``pretrained`` under decoding ``method`` (see ``eval_suites.lmms.methods``).

    Args (``--model_args``): pretrained (a folder or hub id, default the shipped toy LLaVA),
    method (greedy, vcd, dola, vlsae, vlsae-shift, ...), load_in_4bit, dtype ("auto",
    "float16", ...), plus the method's own options (vlsae: space, alpha, beta, a, b, layer,
    site; vcd: cd_alpha, cd_beta, noise_step; dola: dola_layers, relative_top).
    """

    def __init__(self, pretrained: str | None = None, method: str = "greedy", batch_size: int | str = 1,
                 device: str | None = None, dtype: str = "auto", load_in_4bit: bool = False,
                 max_batch_size: int | None = None, **options) -> None:
        super().__init__()
        if method not in LMMS_METHODS:
            raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(LMMS_METHODS))}")
        self.method = LMMS_METHODS[method]
        unknown = sorted(set(options) - set(self.method.options))
        if unknown:
            raise ValueError(f"unknown model_args {unknown} for method {method!r}; it takes {list(self.method.options)}")
        if str(batch_size).startswith("auto"):
            raise ValueError("vlsae_llava needs a fixed --batch_size N")
        self.batch_size_per_gpu = int(batch_size)
        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            self._device = accelerator.device
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.accelerator = accelerator
        if pretrained is None:
            from vlsae_hooks.assets import toy_paths

            pretrained = str(toy_paths().llava)
        load = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype), "device_map": {"": self._device}}
        if load_in_4bit:
            from transformers import BitsAndBytesConfig

            load["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True)
        self.model = AutoModelForImageTextToText.from_pretrained(pretrained, **load).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained)
        self.processor.tokenizer.padding_side = "left"
        self.steering = self.method.steer(self.model, options, self.processor.tokenizer)
        self.steering.__enter__()

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _prompt(self, context: str, n_images: int) -> str:
        content = [{"type": "image"}] * n_images
        content.append({"type": "text", "text": context.replace(IMAGE_PLACEHOLDER, "").strip()})
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    @torch.inference_mode()
    def _generate_batch(self, contexts: list[str], visuals: list[list[Image.Image]], task_kwargs: dict) -> list[str]:
        kwargs, until = generate_kwargs(task_kwargs)
        images = [im.convert("RGB") for row in visuals for im in row]
        texts = [self._prompt(c, len(v)) for c, v in zip(contexts, visuals)]
        inputs = self.processor(images=images or None, text=texts, return_tensors="pt", padding=True).to(self._device)
        out = self.model.generate(**inputs, **kwargs, pad_token_id=self.processor.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [cut_at_stops(t, until).strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order; requests are batched by equal generation arguments."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        answers: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="vlsae_llava")
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].args[0]))  # similar lengths share a batch
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                contexts, visuals = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    contexts.append(context)
                    visuals.append([v for v in doc_to_visual(self.task_dict[task][split][doc_id]) if v is not None])
                for i, text in zip(chunk, self._generate_batch(contexts, visuals, requests[chunk[0]].args[1])):
                    answers[i] = text
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), text)
                progress.update(len(chunk))
        progress.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("vlsae_llava only generates (generate_until tasks such as POPE and CHAIR); "
                                  "log-likelihood scoring is not implemented")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vlsae_llava does not run multi-round generation tasks")
