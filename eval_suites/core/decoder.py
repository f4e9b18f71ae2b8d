"""What a method's decoder must offer, and the plain Hugging Face decoder most methods yield.

A frontend asks a decoder for answers and never sees how they are made: the toy world's
``evaluate`` and the paper's protocols (``reproduce.methods.ProtocolDecoder``) drive any
``Decoder`` the same way, so a method only has to hand one out.
"""

from __future__ import annotations

from typing import Protocol

import torch
from PIL import Image


class Decoder(Protocol):
    def generate(self, images: list[Image.Image], prompts: list[str],
                 max_new_tokens: int) -> list[tuple[str, int]]:
        """Answer each (image, prompt); return (text, number of generated tokens) per item."""


def chat_prompt(processor, prompt: str) -> str:
    """``prompt`` after one image, as the processor's chat template writes a user turn."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


class HFDecoder:
    """Batched ``model.generate`` with left padding; ``generate_kwargs`` choose the strategy."""

    def __init__(self, model, processor, **generate_kwargs):
        self.model, self.processor, self.kwargs = model, processor, generate_kwargs

    @torch.inference_mode()
    def generate(self, images: list[Image.Image], prompts: list[str],
                 max_new_tokens: int) -> list[tuple[str, int]]:
        """(answer text, tokens up to and including EOS, else the non-padding ones) per item."""
        texts = [chat_prompt(self.processor, p) for p in prompts]
        inputs = self.processor(images=images, text=texts, return_tensors="pt",
                                padding=True).to(self.model.device)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **self.kwargs)
        new = out[:, inputs["input_ids"].shape[1]:]
        config = self.model.generation_config
        eos, pad = config.eos_token_id, config.pad_token_id
        results = []
        for row in new:
            hits = (row == eos).nonzero()
            n = int(hits[0]) + 1 if len(hits) else int((row != pad).sum())
            results.append((self.processor.decode(row[:n], skip_special_tokens=True).strip(), n))
        return results
