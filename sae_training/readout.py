r"""Fit a space's word readout: which caption tokens an image's concept code predicts.

Logistic regression from the sparse vision code of each extracted image to the bag of tokens of
its caption, over the tokens common enough to learn and rare enough to mean something
(``ReadoutConfig``). The runtime side and why it exists: ``vlsae_hooks.word_evidence``.

    python -m sae_training readout --space RUN/space --data ACTS \
        --tokenizer llava-hf/llava-1.5-7b-hf

``--data`` is either the extraction the space was trained on (mean image states: the readout
reads the code of the mean, ``pool="mean"``) or an extraction of the space's pooled codes
(``extract --codes-of RUN/space``: the readout reads the max of every image position's code,
``pool="max"``, which measured better on the toy world), or of its pooled dense concept scores
(``extract --codes-of RUN/space --scores``: ``pool="max_scores"``).

``--phrases`` fits the phrase readout instead (``vlsae_hooks.phrase_evidence``): its outputs are
the two-token phrases (adjacent caption tokens) that pass the same count and AUC filters, and it
is saved as ``phrase_readout.safetensors`` beside the word readout.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import trange
from transformers import AutoTokenizer

from sae_training.config import ReadoutConfig
from sae_training.extractors import label_fingerprint, require_existing
from sae_training.logs import logging_while_checking
from sae_training.store import ActivationStore, write_json
from vlsae_hooks.phrase_evidence import PhraseReadout
from vlsae_hooks.spaces import VLSAESpace, read_config
from vlsae_hooks.word_evidence import FINGERPRINT, WordReadout, space_fingerprint

log = logging.getLogger(__name__)
Unit = int | tuple[int, int]
"""What a readout predicts: a token id, or a phrase (first token id, second token id)."""


def metrics_name(phrases: bool) -> str:
    """The readout's metrics file beside the space."""
    return "phrase_readout.json" if phrases else "word_readout.json"


def caption_token_bags(captions: list[str], tokenizer) -> list[set[int]]:
    """The set of token ids of each caption (no special tokens)."""
    ids = tokenizer(captions, add_special_tokens=False)["input_ids"]
    return [set(row) for row in ids]


def caption_phrase_bags(captions: list[str], tokenizer) -> list[set[tuple[int, int]]]:
    """The set of adjacent token pairs (two-token phrases) of each caption."""
    ids = tokenizer(captions, add_special_tokens=False)["input_ids"]
    return [set(zip(row, row[1:])) for row in ids]


def choose_tokens(bags: list[set[Unit]], cfg: ReadoutConfig) -> Tensor:
    """Units (token ids [M], or phrases [M, 2]) in at least ``min_count`` and at most
    ``max_doc_freq`` of the captions, most frequent first, at most ``max_tokens``."""
    counts: dict[Unit, int] = {}
    for bag in bags:
        for token in bag:
            counts[token] = counts.get(token, 0) + 1
    limit = cfg.max_doc_freq * len(bags)
    kept = sorted((t for t, c in counts.items() if cfg.min_count <= c <= limit),
                  key=lambda t: (-counts[t], t))[:cfg.max_tokens]
    if not kept:
        raise ValueError(f"no caption token appears in between {cfg.min_count} and "
                         f"{limit:.0f} of the {len(bags)} captions; lower --min-count")
    return torch.tensor(kept)


def bag_targets(bags: list[set[Unit]], token_ids: Tensor) -> Tensor:
    """float [N, M]: 1 where the caption holds the unit (token, or phrase: a row of
    ``token_ids``)."""
    column = {tuple(t) if isinstance(t, list) else t: j for j, t in enumerate(token_ids.tolist())}
    targets = torch.zeros(len(bags), len(token_ids))
    for i, bag in enumerate(bags):
        hits = [column[t] for t in bag if t in column]
        targets[i, hits] = 1.0
    return targets


def token_aucs(scores: Tensor, targets: Tensor) -> Tensor:
    """ROC AUC of ``scores`` [N, M] per token [M]; nan for a token without both classes."""
    ranks = scores.argsort(0).argsort(0).double() + 1  # ties are rare for continuous scores
    positives = targets.sum(0).double()
    negatives = len(targets) - positives
    usable = (positives > 0) & (negatives > 0)
    rank_sum = (ranks * targets.double()).sum(0)
    auc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives).clamp(min=1)
    return torch.where(usable, auc, torch.nan)


def mean_auc(scores: Tensor, targets: Tensor) -> float:
    """Mean over tokens (with both classes present) of the ROC AUC of ``scores`` [N, M]."""
    return float(token_aucs(scores, targets).nanmean())


@torch.no_grad()
def vision_codes(space: VLSAESpace, store: ActivationStore,
                 batch_size: int) -> tuple[Tensor, Tensor]:
    """Sparse vision codes (values, indices) of every row of the store."""
    values, indices = [], []
    for start in range(0, len(store), batch_size):
        vision, _ = store.get(torch.arange(start, min(start + batch_size, len(store))))
        v, i = space.encode_sparse(vision, "vision")
        values.append(v.float())
        indices.append(i)
    return torch.cat(values), torch.cat(indices)


Codes = Callable[[Tensor], Tensor]
"""Dense float32 codes [len(rows), h] of the given store rows."""


def store_codes(space: VLSAESpace, fingerprint: str, store: ActivationStore,
                batch_size: int) -> tuple[Codes, str]:
    """How to read each store row's code, and the readout's ``pool``: pooled codes are read as
    they are (if they are the codes of these weights, ``fingerprint``); mean states are encoded
    once (k entries per row, held in memory)."""
    n_concepts = space.config.n_concepts
    codes_of = store.manifest.get("codes_of")
    if codes_of:
        if store.d != n_concepts:
            raise ValueError(f"{store.folder} holds pooled codes {store.d} wide, the space has "
                             f"{n_concepts} concepts: they are another space's codes")
        recorded = label_fingerprint(codes_of)
        if recorded is None or not fingerprint.startswith(recorded):
            raise ValueError(f"{store.folder} holds the codes of {codes_of!r}, but this space's "
                             f"weights have sha256 {fingerprint[:16]}: the codes of other weights "
                             "(a space retrained since?) would teach the readout what its "
                             "concepts meant then; extract them again with `python -m "
                             "sae_training extract --codes-of SPACE`")
        return (lambda rows: store.get(rows)[0]), store.manifest.get("pool") or "max"
    if store.d != space.config.d_model:
        raise ValueError(f"{store.folder} holds {store.d}-wide activations, the space encodes "
                         f"{space.config.d_model}-wide ones: not the data it was trained on")
    values, indices = vision_codes(space.float(), store, batch_size)
    return (lambda rows: torch.zeros(len(rows), n_concepts).scatter_(1, indices[rows],
                                                                     values[rows])), "mean"


def fit_readout(codes: Codes, rows: Tensor, targets: Tensor, token_ids: Tensor,
                n_concepts: int, cfg: ReadoutConfig, pool: str = "mean") -> WordReadout:
    """Adam on the logistic loss of the codes of store ``rows`` against their token bags
    (``targets`` [len(rows), M]), on the GPU if there is one. ``token_ids`` [M, 2] (phrases)
    give a ``PhraseReadout``.

    Codes come as dense [batch, h] rows for one matmul with the [h, M] weight: gathering k rows
    of it per sample (as steering does for a few rows) would hold batch * k * M numbers at once.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(cfg.seed)
    prior = targets.mean(0).clamp(1e-6, 1 - 1e-6)
    weight = torch.zeros(n_concepts, len(token_ids), device=device, requires_grad=True)
    bias = torch.log(prior / (1 - prior)).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([weight, bias], lr=cfg.lr)
    steps = math.ceil(len(targets) / cfg.batch_size)
    for epoch in trange(cfg.epochs, desc="readout", unit="epoch"):
        order = torch.randperm(len(targets), generator=generator)
        total = 0.0
        for batch in order.split(cfg.batch_size):
            logits = codes(rows[batch]).to(device) @ weight + bias
            loss = F.binary_cross_entropy_with_logits(logits, targets[batch].to(device)) \
                + cfg.l2 * weight.pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        if epoch % 10 == 0 or epoch == cfg.epochs - 1:
            log.info("readout epoch %d: loss %.4f", epoch, total / steps)
    weight, bias = weight.detach().cpu(), bias.detach().cpu()
    if token_ids.dim() == 2:
        return PhraseReadout(weight, bias, token_ids[:, 1], prior.log(), token_ids[:, 0], pool)
    return WordReadout(weight, bias, token_ids, prior.log(), pool)


def train_readout(cfg: ReadoutConfig) -> dict:
    """Fit, score on held-out captions, and save ``word_readout.safetensors`` (or with
    ``phrases``, ``phrase_readout.safetensors``) into the space."""
    space_dir = Path(cfg.space)
    require_existing(cfg.tokenizer, "--tokenizer")
    kind = read_config(space_dir).kind
    if kind != VLSAESpace.kind:
        raise ValueError(f"{space_dir} is a {kind!r} space; "
                         "a word readout reads VL-SAE concept codes")
    store = ActivationStore(cfg.data, cfg.max_samples)  # a wrong --data: refused, not created
    with logging_while_checking(Path(cfg.data), "readout"):  # refused: no log left in --data
        space = VLSAESpace.from_pretrained(space_dir, load_readout=False)
        fingerprint = space_fingerprint(space_dir)  # of the weights the readout is fitted on
        codes, pool = store_codes(space, fingerprint, store, cfg.batch_size)
        if cfg.phrases and pool == "mean":
            raise ValueError(f"{cfg.data} holds mean states; a phrase readout reads pooled "
                             "concept scores: extract them with `python -m sae_training extract "
                             f"--codes-of {space_dir} --scores ...` and pass that folder as --data")
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    captions = [caption for _, caption in store.captions(torch.arange(len(store)))]
    bags = (caption_phrase_bags if cfg.phrases else caption_token_bags)(captions, tokenizer)
    if cfg.phrases and cfg.phrase_of_words:
        words = read_words(space_dir)
        bags = [{p for p in bag if p[0] in words and p[1] in words} for bag in bags]
    split = torch.randperm(len(bags), generator=torch.Generator().manual_seed(cfg.seed))
    n_val = max(1, int(cfg.val_fraction * len(bags)))
    val, train = split[:n_val], split[n_val:]
    token_ids = choose_tokens([bags[i] for i in train.tolist()], cfg)
    targets = bag_targets(bags, token_ids)
    readout = fit_readout(codes, train, targets[train], token_ids, space.config.n_concepts, cfg,
                          pool)
    with torch.no_grad():
        val_logits = readout.logits_dense(codes(val))
    aucs = token_aucs(val_logits, targets[val])
    keep = ~(aucs < cfg.min_auc)  # a token the held-out captions cannot score is kept
    if not keep.any():
        raise ValueError(f"no caption token reaches a held-out AUC of {cfg.min_auc} from the "
                         "images' codes: are the captions paired with their images? (lower "
                         "--min-auc to keep tokens anyway)")
    val_auc = mean_auc(val_logits, targets[val])  # nan: no token has both classes held out
    metrics = {"pool": pool, "n_tokens": int(keep.sum()), "n_train": len(train), "n_val": len(val),
               "dropped_tokens": unit_names(tokenizer, token_ids[~keep]),
               "val_mean_auc": None if math.isnan(val_auc) else val_auc,
               "val_bce": float(F.binary_cross_entropy_with_logits(val_logits, targets[val])),
               "val_bce_prior_only": float(F.binary_cross_entropy_with_logits(
                   readout.bias.expand_as(val_logits), targets[val])),
               "tokens": unit_names(tokenizer, token_ids[keep][:50]),
               FINGERPRINT: fingerprint,
               "config": {k: v for k, v in vars(cfg).items()}}
    readout.select(keep).save(space_dir)
    write_json(space_dir / metrics_name(cfg.phrases), metrics)
    log.info("%s readout (%s-pooled): %d kept (%d below held-out AUC %.2f dropped), held-out "
             "mean AUC %.3f -> %s", "phrase" if cfg.phrases else "word", pool, int(keep.sum()),
             int((~keep).sum()), cfg.min_auc, val_auc, space_dir)
    return metrics


def read_words(space_dir: Path) -> set[int]:
    """The token ids the space's word readout reads."""
    if not (space_dir / WordReadout.FILE).is_file():
        raise FileNotFoundError(f"{space_dir} has no {WordReadout.FILE}: --phrases keeps the "
                                "phrases of its words, so fit the word readout first (or pass "
                                "--no-phrase-of-words)")
    return set(WordReadout.load(space_dir).token_ids.tolist())


def unit_names(tokenizer, units: Tensor) -> list[str]:
    """Readable names of tokens [M] or phrases [M, 2] ("red star")."""
    if units.dim() == 1:
        return tokenizer.convert_ids_to_tokens(units.tolist())
    return [tokenizer.decode(pair) for pair in units.tolist()]
