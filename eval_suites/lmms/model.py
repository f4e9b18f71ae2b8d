"""``--model vlsae_llava``: a llava-hf (or Qwen2.5-VL) model under one of our decoding
methods, taking the stock ``llava_hf`` model's loading options and wording its prompts alike.

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

from sae_training.hub_kernels import offline_kernels
from vlsae_hooks.placement import requested_device

from .methods import LMMS_METHODS

PASS_THROUGH = ("top_k", "repetition_penalty", "length_penalty", "no_repeat_ngram_size")
"""Task generation arguments handed to ``generate`` unchanged."""
IMAGE_PLACEHOLDER = "<image>"
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}A chat between a curious user and an "
    "artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers "
    "to the user's questions. USER: {{ message['content'] }} {% elif message['role'] == 'user' %}"
    "USER: {{ message['content'] }} {% else %} ASSISTANT: {{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
"""lmms-eval's ``llava_hf`` fallback for a tokenizer without a chat template (copied: importing
that module needs ``decord``)."""


DTYPES = ("auto", "float16", "bfloat16", "float32")
"""The ``dtype`` model_args a model loads in."""


def generate_kwargs(task_kwargs: dict) -> tuple[dict, list[str]]:
    """lmms-eval generation arguments -> (``generate`` kwargs, stop strings).

    lmms-eval's convention: temperature 0 means greedy whatever ``do_sample`` says."""
    task_kwargs = dict(task_kwargs)
    until = task_kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(task_kwargs.get("temperature") or 0.0)
    do_sample = task_kwargs.get("do_sample")  # left out or null: sample when temperature > 0
    do_sample = (temperature > 0 if do_sample is None else bool(do_sample)) and temperature > 0
    max_new_tokens = task_kwargs.get("max_new_tokens")  # a task may leave it null
    kwargs = {"max_new_tokens": 256 if max_new_tokens is None else int(max_new_tokens),
              "do_sample": do_sample,
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

    Args (``--model_args``): pretrained (a folder or hub id; the shipped toy LLaVA is
    ``eval_suites/toyworld/assets/llava``),
    method (greedy, vcd, dola, vlsae, vlsae-reference, ...), load_in_4bit, dtype ("auto",
    "float16", ...); as the stock ``llava_hf`` takes them: revision, attn_implementation,
    device_map (default: the whole model on ``device``), chat_template; plus the method's own
    options (its row of ``LMMS_METHODS``: e.g. vlsae-contrast: space, alpha, image_weight,
    contrast_weight, plausibility_cutoff, layer, site; vcd: cd_alpha, cd_beta, noise_step;
    dola: dola_layers, relative_top).
    """

    def __init__(self, pretrained: str, method: str = "greedy",
                 batch_size: int | str = 1, device: str | None = None, dtype: str = "auto",
                 load_in_4bit: bool = False, max_batch_size: int | None = None,
                 revision: str = "main", attn_implementation: str | None = None,
                 device_map: str | None = None, chat_template: str | None = None,
                 **options) -> None:
        super().__init__()
        if method not in LMMS_METHODS:
            raise ValueError(f"unknown method {method!r}; "
                             f"available: {', '.join(sorted(LMMS_METHODS))}")
        self.method = LMMS_METHODS[method]
        unknown = sorted(set(options) - set(self.method.options))
        if unknown:
            raise ValueError(f"unknown model_args {unknown} for method {method!r}; "
                             f"it takes {list(self.method.options)}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: vlsae_llava loads the model in one of {DTYPES}")
        if str(batch_size).startswith("auto"):
            raise ValueError("vlsae_llava needs a fixed --batch_size N")
        self.batch_size_per_gpu = int(batch_size)
        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            self._device = accelerator.device
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        else:
            self._device = requested_device(device)
        self.accelerator = accelerator
        load = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype), "revision": revision,
                "attn_implementation": attn_implementation,
                "device_map": device_map or {"": self._device}}  # llava_hf's "" too
        if load_in_4bit:
            from transformers import BitsAndBytesConfig

            load["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True)
        self.model = AutoModelForImageTextToText.from_pretrained(
            pretrained, **offline_kernels(load)).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, revision=revision)
        self.processor.tokenizer.padding_side = "left"
        self.chat_template = chat_template
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
        """The prompt as ``llava_hf`` words it, so that greedy answers match ``--model llava_hf``:
        one user turn, the text after its images' ``<image>`` tokens (unless it places them),
        under ``chat_template``, else the tokenizer's template, else Vicuna's.

        A template that reads content items (Qwen2.5-VL's image token is not ``<image>``; under
        transformers 5 a LLaVA tokenizer may carry its processor's template) would drop string
        content, where ``llava_hf`` fails: it gets the items instead."""
        tokenizer = self.processor.tokenizer
        if getattr(self.processor, "image_token", None) == IMAGE_PLACEHOLDER:
            if n_images and IMAGE_PLACEHOLDER not in context:
                context = " ".join([IMAGE_PLACEHOLDER] * n_images) + "\n" + context
            template = self.chat_template or tokenizer.chat_template or VICUNA_CHAT_TEMPLATE
            text = tokenizer.apply_chat_template([{"role": "user", "content": context}],
                                                 chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
            if context.strip() in text:
                return text
        content = [{"type": "image"}] * n_images
        content.append({"type": "text", "text": context.replace(IMAGE_PLACEHOLDER, "").strip()})
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  chat_template=self.chat_template,
                                                  add_generation_prompt=True)

    @torch.inference_mode()
    def _generate_batch(self, contexts: list[str], visuals: list[list[Image.Image]],
                        task_kwargs: dict) -> list[str]:
        kwargs, until = generate_kwargs(task_kwargs)
        # as llava_hf: the processor converts to RGB (transparency onto white, not PIL's drop)
        images = [im for row in visuals for im in row]
        texts = [self._prompt(c, len(v)) for c, v in zip(contexts, visuals)]
        inputs = self.processor(images=images or None, text=texts, return_tensors="pt",
                                padding=True).to(self._device)
        out = self.model.generate(**inputs, **kwargs,
                                  pad_token_id=self.processor.tokenizer.pad_token_id)
        texts = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                            skip_special_tokens=True)
        return [cut_at_stops(t, until).strip() for t in texts]

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
                    doc = self.task_dict[task][split][doc_id]
                    visuals.append([v for v in doc_to_visual(doc) if v is not None])
                texts = self._generate_batch(contexts, visuals, requests[chunk[0]].args[1])
                for i, text in zip(chunk, texts):
                    answers[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], text)
                progress.update(len(chunk))
        progress.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("vlsae_llava only generates (generate_until tasks such as POPE "
                                  "and CHAIR); log-likelihood scoring is not implemented")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vlsae_llava does not run multi-round generation tasks")
