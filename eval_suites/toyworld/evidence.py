"""Is there visual evidence against the absent partner that the model does not already use?

A decode-time method that reads the image side can only add what the image representations
show beyond the model's own answer. This measures both on held-out scenes:

- the image-side ceiling: at the input of every decoder layer (index 0: the projector's output),
  the image positions mean-pooled, and one ridge probe per class fitted on training-distribution
  scenes (labels: the objects drawn, so hidden partners count as present, as in the captions);
- the model's own reading: its "yes" minus "no" logit for "Is there a <object> in the image?".

Each is scored by ROC AUC: present objects against absent partners (the hallucination to fix)
and absent partners against other absent objects (how much the pair prior leaks in).

    python -m eval_suites.toyworld evidence --seed 7 --n-images 300 --json OUT.json
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sae_training.extract import masked_mean

from .evaluate import chat_prompt, load_model
from .language import EVAL_QUESTION
from .world import CLASS_NAMES, CLASSES, STREAM_TRAIN, RenderedScene, heldout_scenes, make_scene, partner_of

DESCRIBE = "Describe the image."


@dataclass(frozen=True)
class EvidenceSettings:
    seed: int = 7
    """Held-out seed the probes and the model are scored on."""
    n_images: int = 300
    n_train: int = 3000
    """Training-distribution scenes (seed 0) the probes are fitted on."""
    ridge: float = 10.0
    """L2 penalty of the probes (features standardised first)."""
    batch_size: int = 100
    model_path: str | None = None


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC = P(score of a positive > score of a negative), ties counted half."""
    pos, neg = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def labels(scenes: list[RenderedScene]) -> np.ndarray:
    """bool [n, C]: which classes each scene shows."""
    y = np.zeros((len(scenes), len(CLASSES)), dtype=bool)
    for i, s in enumerate(scenes):
        y[i, list(s.scene.classes)] = True
    return y


def separations(scores: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """AUCs of per-(scene, class) ``scores``: present vs absent partner, partner vs other absent."""
    partner = np.zeros_like(y)
    for c in range(len(CLASSES)):
        mate = partner_of(c)
        if mate is not None:
            partner[:, c] = y[:, mate] & ~y[:, c]
    other = ~y & ~partner
    return {"present_vs_absent_partner": auc(scores[y], scores[partner]),
            "absent_partner_vs_other_absent": auc(scores[partner], scores[other])}


@torch.inference_mode()
def image_features(model, processor, scenes: list[RenderedScene], batch_size: int) -> list[torch.Tensor]:
    """Per layer input (0 = embeddings/projector output), the image positions' mean [n, d]."""
    image_id = model.config.image_token_id
    prompt = chat_prompt(processor, DESCRIBE)
    per_layer: list[list[torch.Tensor]] = []
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start:start + batch_size]
        inputs = processor(images=[s.image for s in chunk], text=[prompt] * len(chunk),
                           return_tensors="pt", padding=True)
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        image = inputs["input_ids"] == image_id
        for layer, h in enumerate(hidden[:-1]):  # the last entry is the final norm's output
            if len(per_layer) <= layer:
                per_layer.append([])
            per_layer[layer].append(masked_mean(h, image))
    return [torch.cat(chunks) for chunks in per_layer]


def ridge_scores(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, l2: float) -> np.ndarray:
    """One ridge regression per class on standardised features; test scores [n_test, C]."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    design = torch.cat([(train_x - mean) / std, torch.ones(len(train_x), 1)], 1)
    gram = design.T @ design + l2 * torch.eye(design.shape[1])
    weights = torch.linalg.solve(gram, design.T @ torch.tensor(train_y, dtype=torch.float32))
    test = torch.cat([(test_x - mean) / std, torch.ones(len(test_x), 1)], 1)
    return (test @ weights).numpy()


@torch.inference_mode()
def yes_margins(model, processor, scenes: list[RenderedScene], batch_size: int) -> np.ndarray:
    """The model's "yes" minus "no" next-token logit for every (scene, class) question [n, C]."""
    tokenizer = processor.tokenizer
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    prompts = [chat_prompt(processor, EVAL_QUESTION.format(obj=name)) for name in CLASS_NAMES]
    pairs = [(s.image, p) for s in scenes for p in prompts]
    margins = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        inputs = processor(images=[i for i, _ in chunk], text=[p for _, p in chunk],
                           return_tensors="pt", padding=True, padding_side="left")
        logits = model(**inputs).logits[:, -1]
        margins.append(logits[:, yes] - logits[:, no])
    return torch.cat(margins).view(len(scenes), len(CLASSES)).numpy()


def measure_evidence(settings: EvidenceSettings, model=None, processor=None) -> dict:
    """Probe AUCs per layer and the model's own AUCs on the held-out scenes of ``settings.seed``."""
    if model is None:
        model, processor = load_model(settings.model_path)
    train = [make_scene(0, STREAM_TRAIN, i) for i in range(settings.n_train)]
    held = heldout_scenes(settings.seed, settings.n_images)
    y_train, y_held = labels(train), labels(held)
    train_x = image_features(model, processor, train, settings.batch_size)
    held_x = image_features(model, processor, held, settings.batch_size)
    probes = {f"layer_{layer}_input": separations(
        ridge_scores(a, y_train, b, settings.ridge), y_held) for layer, (a, b) in enumerate(zip(train_x, held_x))}
    model_own = separations(yes_margins(model, processor, held, settings.batch_size), y_held)
    best = max(p["present_vs_absent_partner"] for p in probes.values())
    return {"seed": settings.seed, "n_images": settings.n_images, "n_train": settings.n_train,
            "probes": probes, "model_yes_margin": model_own,
            "headroom": best - model_own["present_vs_absent_partner"]}
