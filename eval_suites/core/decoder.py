"""What a method's decoder must offer, and the one Hugging Face decoder every frontend uses.

A frontend asks a decoder for answers and never sees how they are made: the toy world's
``evaluate`` and the paper's protocols drive any ``Decoder`` the same way, so a method only has
to hand one out. ``HFDecoder`` is batched ``generate`` on chat-template prompts; the protocols
give it LLaVA-1.5's system line, the toy world none.
"""

from __future__ import annotations

from typing import Protocol

import torch
from PIL import Image


class Decoder(Protocol):
    def generate(self, images: list[Image.Image], prompts: list[str],
                 max_new_tokens: int) -> list[tuple[str, int]]:
        """Answer each (image, prompt); return (text, number of generated tokens) per item."""


def chat_prompt(processor, prompt: str, system_prompt: str | None = None) -> str:
    """``prompt`` after one image, as the processor's chat template writes a user turn (after a
    system turn when ``system_prompt`` is given)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    return processor.apply_chat_template(messages, add_generation_prompt=True)


class HFDecoder:
    """Batched ``model.generate`` with left padding; ``generate_kwargs`` choose the strategy."""

    def __init__(self, model, processor, system_prompt: str | None = None,
                 **generate_kwargs) -> None:
        self.model, self.processor, self.kwargs = model, processor, generate_kwargs
        self.system_prompt = system_prompt
        processor.tokenizer.padding_side = "left"  # generation continues on the right

    def render(self, prompt: str) -> str:
        """The full prompt text, image placeholder included, as the model sees it."""
        return chat_prompt(self.processor, prompt, self.system_prompt)

    @torch.inference_mode()
    def generate(self, images: list[Image.Image], prompts: list[str],
                 max_new_tokens: int) -> list[tuple[str, int]]:
        """(answer text, tokens up to and including the first EOS, else the non-padding ones)
        per item; a model may have several EOS ids."""
        inputs = self.processor(images=images, text=[self.render(p) for p in prompts],
                                return_tensors="pt", padding=True).to(self.model.device)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **self.kwargs)
        new = out[:, inputs["input_ids"].shape[1]:]
        config = self.model.generation_config
        eos = config.eos_token_id
        eos = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        # generate pads a finished row with pad_token_id, or without one with the first EOS id
        pad = config.pad_token_id if config.pad_token_id is not None else next(iter(eos), None)
        eos_ids = torch.tensor(eos, dtype=new.dtype, device=new.device)
        results = []
        for row in new:
            hits = torch.isin(row, eos_ids).nonzero()
            n = (int(hits[0]) + 1 if len(hits) else
                 len(row) if pad is None else int((row != pad).sum()))
            results.append((self.processor.decode(row[:n], skip_special_tokens=True).strip(), n))
        return results
