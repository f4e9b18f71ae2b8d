"""Decoding methods of the protocols: the plain model and VL-SAE steering in each of its modes.

``open_method`` attaches the space for the duration of a run around a decoder that renders
prompts as LLaVA-1.5's conversation (the reference's ``llava_v1`` template: system line, then
``USER: <image>\\n{prompt} ASSISTANT:``). The toy world's
``vlsae-reference`` method (``eval_suites.toyworld.steered_methods``) is the same mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from PIL import Image

from vlsae_hooks import SteeringHandle, attach
from vlsae_hooks.spaces import ConceptSpace

RECOMMENDED = "recommended"
"""The ``METHOD_MODES`` value of ``vlsae``: ``attach`` with no mode, i.e. what the space
recommends (its ``steering.json``), else the reference's contrast."""
METHOD_MODES: dict[str, str | None] = {
    "regular": None,  # the plain model, decoded as the protocol says (the papers' "regular" row)
    "greedy": None,  # the plain model, always greedy
    "sample": None,  # the plain model, always T = 1 sampling (the vocabulary's "sample")
    "vlsae": RECOMMENDED,  # what attach(model, space) does: the space's recommendation
    "vlsae-contrast": "contrast",  # cached contrast steering, the reference's method
    "vlsae-shift": "shift",  # hidden-state shift only, one branch
    "vlsae-reference": "reference",  # uncached, two full passes per token: the reference itself
    "vlsae-evidence": "evidence",  # the space's readouts as evidence on the logits
    "vlsae-grounding": "grounding",  # the space's patch readout, per patch, on the logits
}
"""Protocol method name -> ``attach`` mode (None: no steering); the same names as ``attach``'s
docs, the toy world and the lmms plugin use. A table of its own rather than the registry of
``eval_suites.core.methods``: a protocol run has one decoder (``ProtocolDecoder``, the
reference's prompt and sampling) and takes the space and the strengths from its settings, so a
method here is only the mode to attach."""
REALIGNMENT_MODES = ("contrast", "shift", "reference")
"""Modes that take the reference's alpha, image_weight, contrast_weight and
plausibility_cutoff; the others take only what is given."""

LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's "
                   "questions.")
"""The system line of LLaVA-1.5's ``llava_v1`` conversation, which the reference prompts with."""


class ProtocolDecoder:
    """Batched ``model.generate`` on LLaVA-1.5 conversations; ``generate_kwargs`` pick the strategy.

    A ``core.decoder.Decoder``, which also renders prompts for the report and holds the steering."""

    def __init__(self, model, processor, system_prompt: str = LLAVA_V1_SYSTEM,
                 **generate_kwargs) -> None:
        self.model, self.processor = model, processor
        self.system_prompt, self.kwargs = system_prompt, generate_kwargs
        self.handle: SteeringHandle | None = None
        """The steering attached by ``open_method`` (None for the plain model)."""
        processor.tokenizer.padding_side = "left"  # generation continues on the right

    def render(self, prompt: str) -> str:
        """The full prompt text, image placeholder included, as the model's chat template writes
        it."""
        messages = [{"role": "user",
                     "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if self.system_prompt:
            messages.insert(0, {"role": "system",
                                "content": [{"type": "text", "text": self.system_prompt}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    @torch.inference_mode()
    def generate(self, images: list[Image.Image], prompts: list[str],
                 max_new_tokens: int) -> list[tuple[str, int]]:
        """(answer text, number of generated tokens up to and including EOS) per item."""
        inputs = self.processor(images=images, text=[self.render(p) for p in prompts],
                                return_tensors="pt", padding=True).to(self.model.device)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **self.kwargs)
        eos = self.model.generation_config.eos_token_id
        eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos], device=out.device)
        results = []
        for row in out[:, inputs["input_ids"].shape[1]:]:
            ends = torch.isin(row, eos_ids).nonzero()
            n = int(ends[0]) + 1 if len(ends) else len(row)
            results.append((self.processor.decode(row[:n], skip_special_tokens=True).strip(), n))
        return results


@contextlib.contextmanager
def open_method(decoder: ProtocolDecoder, method: str, space: ConceptSpace | None,
                **steering) -> Iterator[ProtocolDecoder]:
    """``decoder`` with ``method``'s steering attached while the block runs (none for plain)."""
    if method not in METHOD_MODES:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHOD_MODES)}")
    mode = METHOD_MODES[method]
    if mode is None:
        yield decoder
        return
    mode_option = {} if mode == RECOMMENDED else {"mode": mode}
    with attach(decoder.model, space, **mode_option, **steering) as handle:
        decoder.handle = handle
        try:
            yield decoder
        finally:
            decoder.handle = None
