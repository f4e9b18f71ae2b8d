"""The toy LLaVA's training sequences: LLaVA-1.5 conversations about one image (captions and
yes/no turns), batched, and the loss that weighs a short answer as much as a caption."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

from .build import IMAGE, N_IMAGE_TOKENS
from .language import QUESTION_TEMPLATES
from .world import CLASS_NAMES, CLASSES, RenderedScene


def _encode(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def conversation(tok: PreTrainedTokenizerFast,
                 turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and labels of a LLaVA-1.5 conversation about one image; only answers are labelled.

    Same tokens as the processor produces for ``USER: <image>\\n{q} ASSISTANT:`` at inference.
    """
    image_id = tok.convert_tokens_to_ids(IMAGE)
    ids = [tok.bos_token_id] + _encode(tok, "USER:") + [image_id] * N_IMAGE_TOKENS
    labels = [-100] * len(ids)
    for i, (question, answer) in enumerate(turns):
        prompt = _encode(tok, (" " if i == 0 else "USER: ") + question + " ASSISTANT:")
        reply = _encode(tok, answer) + [tok.eos_token_id]
        ids += prompt + reply
        labels += [-100] * len(prompt) + reply
    return ids, labels


def yes_no_turns(scene: RenderedScene, rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """``n`` questions about the scene, each about a shown or (as often) an absent class."""
    present = list(scene.scene.classes)
    absent = [c for c in range(len(CLASSES)) if c not in present]
    turns = []
    for _ in range(n):
        yes = rng.random() < 0.5
        cls = int(rng.choice(present if yes else absent))
        template = QUESTION_TEMPLATES[int(rng.integers(len(QUESTION_TEMPLATES)))]
        turns.append((template.format(obj=CLASS_NAMES[cls]), "yes" if yes else "no"))
    return turns


def padded_batch(tok, seqs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """(ids, labels) sequences right-padded into one batch with its attention mask."""
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lab) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(lab)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def sequence_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of each sequence's mean token loss: short answers weigh as much as
    captions."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    tok_loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    mask = (labels != -100).float()
    return ((tok_loss * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
