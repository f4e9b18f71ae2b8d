"""Is there visual evidence against the absent partner that the model does not already use?

A decode-time method that reads the image side can only add what the image representations
show beyond the model's own answer. This measures both on held-out scenes:

- the image-side ceiling: at the input of every decoder layer (index 0: the projector's output),
  the image positions mean-pooled, and one ridge probe per class fitted on training-distribution
  scenes (labels: the objects drawn, so hidden partners count as present, as in the captions);
- the model's own reading: its "yes" minus "no" logit for "Is there a <object> in the image?";
- the concept space's reading, when the model has a VL-SAE space registered: how much each
  question's concepts overlap the image's (``concept_scores``), and the image's concepts read as
  words, through the LM head or through the space's word readout (``word_scores``), with
  wrong-image controls.

Each is scored by ROC AUC: present objects against absent partners (the hallucination to fix),
absent partners against other absent objects (how much the pair prior leaks in), and present
objects against absent objects of a colour the scene shows (binding: "a red ring" beside a red
star). The phrase readout, if the space has one, is read the same way ("phrase_readout").

    python -m eval_suites.toyworld evidence --seed 7 --n-images 300 --json OUT.json
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlsae_hooks.pooling import masked_mean, pooled_inputs, prefill_masks
from vlsae_hooks.registry import find_space
from vlsae_hooks.spaces import ConceptSpace, load_space

from ..core.decoder import chat_prompt
from .evaluate import load_model
from .language import EVAL_QUESTION
from .world import (
    CLASS_NAMES,
    CLASSES,
    SHAPE_SYNONYMS,
    STREAM_TRAIN,
    RenderedScene,
    heldout_scenes,
    make_scene,
    partner_of,
)

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
    """AUCs of per-(scene, class) ``scores``: present vs absent partner, partner vs other absent,
    present vs absent of a shown colour."""
    partner, same_colour = np.zeros_like(y), np.zeros_like(y)
    for c, (colour, _) in enumerate(CLASSES):
        mate = partner_of(c)
        if mate is not None:
            partner[:, c] = y[:, mate] & ~y[:, c]
        shades = [d for d, (other, _) in enumerate(CLASSES) if other == colour and d != c]
        same_colour[:, c] = y[:, shades].any(1) & ~y[:, c]
    other = ~y & ~partner
    return {"present_vs_absent_partner": auc(scores[y], scores[partner]),
            "absent_partner_vs_other_absent": auc(scores[partner], scores[other]),
            "present_vs_absent_same_colour": auc(scores[y], scores[same_colour])}


@torch.inference_mode()
def image_features(model, processor, scenes: list[RenderedScene], batch_size: int,
                   pool_space: ConceptSpace | None = None,
                   pools: tuple[str, ...] = (),
                   ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Per layer input (0 = embeddings/projector output), the image positions' mean [n, d];
    with ``pool_space``, from the same passes, for each of ``pools`` ("max", "max_scores") what
    a readout with that pool reads from the image positions at that space's site [n, h]."""
    image_id = model.config.image_token_id
    prompt = chat_prompt(processor, DESCRIBE)
    per_layer: list[list[torch.Tensor]] = []
    pooled: dict[str, list[torch.Tensor]] = {pool: [] for pool in pools}
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
        if pools:
            batch = pooled_inputs(pool_space, hidden[pool_space.config.layer], image, "vision",
                                  pools)
            for pool, chunks in pooled.items():
                chunks.append(batch[pool])
    return ([torch.cat(chunks) for chunks in per_layer],
            {pool: torch.cat(chunks) for pool, chunks in pooled.items()})


def ridge_scores(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor,
                 l2: float) -> np.ndarray:
    """One ridge regression per class on standardised features; test scores [n_test, C]."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    design = torch.cat([(train_x - mean) / std, torch.ones(len(train_x), 1)], 1)
    gram = design.T @ design + l2 * torch.eye(design.shape[1])
    weights = torch.linalg.solve(gram, design.T @ torch.tensor(train_y, dtype=torch.float32))
    test = torch.cat([(test_x - mean) / std, torch.ones(len(test_x), 1)], 1)
    return (test @ weights).numpy()


@torch.inference_mode()
def question_passes(model, processor, scenes: list[RenderedScene], batch_size: int,
                    site_layer: int | None = None,
                    ) -> tuple[np.ndarray, torch.Tensor | None, torch.Tensor | None]:
    """Every (scene, class) question "Is there a <object> in the image?" run once.

    Returns the model's "yes" minus "no" next-token logit [n, C] and, if ``site_layer`` is
    given, the image and text (after the image) means at that layer's input [n, C, d].
    """
    tokenizer = processor.tokenizer
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    prompts = [chat_prompt(processor, EVAL_QUESTION.format(obj=name)) for name in CLASS_NAMES]
    pairs = [(s.image, p) for s in scenes for p in prompts]
    vision_token_ids = torch.tensor([model.config.image_token_id])
    margins, vision, text = [], [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        inputs = processor(images=[i for i, _ in chunk], text=[p for _, p in chunk],
                           return_tensors="pt", padding=True, padding_side="left")
        out = model(**inputs, output_hidden_states=site_layer is not None)
        logits = out.logits[:, -1]
        margins.append(logits[:, yes] - logits[:, no])
        if site_layer is not None:
            masks = prefill_masks(inputs["input_ids"], inputs["attention_mask"], vision_token_ids)
            hidden = out.hidden_states[site_layer]
            vision.append(masked_mean(hidden, masks[0]))
            text.append(masked_mean(hidden, masks[1]))
    shape = (len(scenes), len(CLASSES))
    margin = torch.cat(margins).view(shape).numpy()
    if site_layer is None:
        return margin, None, None
    return margin, torch.cat(vision).view(*shape, -1), torch.cat(text).view(*shape, -1)


@torch.inference_mode()
def concept_scores(space: ConceptSpace, vision: torch.Tensor,
                   text: torch.Tensor) -> dict[str, np.ndarray]:
    """How much each question's own concepts overlap the image's, in the concept space [n, C].

    ``z_v . (z_t - mean over the scene's questions of z_t)``: the text code of a question carries
    the image too (its positions attend to it), so the scene's mean question code is taken out
    to leave what this question adds. "wrong_image" scores each scene's questions against the
    previous scene's image code: a grounded score falls to chance there.
    """
    n, c, d = text.shape
    z_v = space.encode(vision.reshape(-1, d), "vision").float().view(n, c, -1)
    z_t = space.encode(text.reshape(-1, d), "text").float().view(n, c, -1)
    own_part = z_t - z_t.mean(1, keepdim=True)
    return {"own_image": (z_v * own_part).sum(-1).numpy(),
            "wrong_image": (z_v.roll(1, 0) * own_part).sum(-1).numpy()}


@torch.inference_mode()
def word_scores(model, processor, space: ConceptSpace, image_mean: torch.Tensor,
                image_pooled: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Class scores [n, C] read from the image's concept code as words (colour + shape word):

    - "decoded_through_lm_head": the code decoded by the text decoder, then the final norm and
      LM head (log-probabilities, minus their mean over the scenes);
    - "word_readout" / "word_readout_wrong_image" (if the space has one): the evidence-mode
      readout's log p(word | code) minus its caption base rate, for the scene's own code and
      for the previous scene's (``image_pooled[pool]`` for a readout of pooled codes or scores);
    - "phrase_readout" / "phrase_readout_wrong_image" (if the space has one): the phrase
      readout's log ratio of the class's phrase (colour, shape word), the best over the shape's
      synonyms; a class it does not read scores 0.
    """
    vocab = processor.tokenizer.get_vocab()
    values, indices = space.encode_sparse(image_mean, "vision")
    decoded = space.decode_sparse(values, indices, "text")
    lens = torch.log_softmax(model.lm_head(model.model.language_model.norm(decoded)).float(), -1)
    per_word = {"decoded_through_lm_head": lens - lens.mean(0)}
    readout = space.readout("word_readout")
    if readout is not None:
        column = {int(t): j for j, t in enumerate(readout.token_ids)}
        log_p = (readout.log_ratio(values, indices) if readout.pool == "mean"
                 else readout.log_ratio_dense(image_pooled[readout.pool]))
        full = torch.zeros(len(log_p), lens.shape[-1])  # words it does not read: no evidence
        full[:, list(column)] = log_p
        per_word["word_readout"] = full
        per_word["word_readout_wrong_image"] = full.roll(1, 0)
    out = {}
    for name, table in per_word.items():
        out[name] = np.stack([(table[:, vocab[colour]] + table[:, vocab[shape]]).numpy()
                              for colour, shape in CLASSES], 1)
    phrases = space.readout("phrase_readout")
    if phrases is not None:
        log_ratio = phrases.log_ratio_dense(image_pooled[phrases.pool])
        index = {pair: j for j, pair in enumerate(zip(phrases.first_ids.tolist(),
                                                      phrases.token_ids.tolist()))}
        table = np.zeros((len(log_ratio), len(CLASSES)), dtype=np.float32)
        for c, (colour, shape) in enumerate(CLASSES):
            columns = [index[(vocab[colour], vocab[word])] for word in SHAPE_SYNONYMS[shape]
                       if (vocab.get(colour), vocab.get(word)) in index]
            if columns:
                table[:, c] = log_ratio[:, columns].max(1).values.numpy()
        out["phrase_readout"], out["phrase_readout_wrong_image"] = table, np.roll(table, 1, 0)
    return out


def measure_evidence(settings: EvidenceSettings, model=None, processor=None) -> dict:
    """Probe AUCs per layer and the model's own AUCs on the held-out scenes of ``settings.seed``."""
    if model is None:
        model, processor = load_model(settings.model_path)
    train = [make_scene(0, STREAM_TRAIN, i) for i in range(settings.n_train)]
    held = heldout_scenes(settings.seed, settings.n_images)
    y_train, y_held = labels(train), labels(held)
    space = find_registered_space(model)
    site = space.config.layer if space is not None else None
    readouts = () if space is None else (space.readout("word_readout"),
                                         space.readout("phrase_readout"))  # a stale one: refused
    pools = tuple(sorted({readout.pool for readout in readouts
                          if readout is not None and readout.pool != "mean"}))
    train_x, _ = image_features(model, processor, train, settings.batch_size)
    held_x, held_pooled = image_features(model, processor, held, settings.batch_size, space, pools)
    probes = {f"layer_{layer}_input": separations(
        ridge_scores(a, y_train, b, settings.ridge), y_held)
        for layer, (a, b) in enumerate(zip(train_x, held_x))}
    margins, vision, text = question_passes(model, processor, held, settings.batch_size, site)
    model_own = separations(margins, y_held)
    best = max(p["present_vs_absent_partner"] for p in probes.values())
    result = {"seed": settings.seed, "n_images": settings.n_images, "n_train": settings.n_train,
              "probes": probes, "model_yes_margin": model_own,
              "headroom": best - model_own["present_vs_absent_partner"]}
    if space is not None:
        scores = {**concept_scores(space, vision, text),
                  **word_scores(model, processor, space, held_x[site], held_pooled)}
        result["concept_space"] = {"site": f"layer_{site}_input", **{
            name: separations(values, y_held) for name, values in scores.items()}}
    return result


def find_registered_space(model) -> ConceptSpace | None:
    """The VL-SAE space registered for ``model`` (e.g. its ``vlsae_space/`` folder), if any."""
    path = find_space(model)
    if path is None:
        return None
    space = load_space(path)
    return space if space.config.kind == "vlsae" and space.config.site == "layer_input" else None
