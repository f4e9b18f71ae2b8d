"""A random-weight LLaVA with the toy world's processor, for tests that need the real prompt
format but not a trained model (the shipped toy model may not exist yet)."""

from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from eval_suites.core.decoder import chat_prompt
from eval_suites.toyworld.build import build_llava_processor, llava_config
from eval_suites.toyworld.world import heldout_scenes


def random_toy_llava(seed: int = 0):
    processor = build_llava_processor()
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(llava_config(processor.tokenizer)).eval(), processor


def save_random_toy_llava(path: Path, seed: int = 0) -> Path:
    model, processor = random_toy_llava(seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def toy_inputs(processor, prompts: list[str], seed: int = 1):
    """Left-padded chat inputs, one held-out scene per prompt."""
    images = [s.image for s in heldout_scenes(seed, len(prompts))]
    return processor(images=images, text=[chat_prompt(processor, p) for p in prompts],
                     return_tensors="pt", padding=True)
