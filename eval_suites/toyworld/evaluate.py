"""Score a decoding method on freshly generated held-out scenes: POPE (5 splits) and CHAIR.

A method is a factory of the registry (``eval_suites.core.methods``): ``(model, processor) ->
context manager yielding a Decoder``, which turns (images, prompts) into answers. Greedy is the
plain one; importing ``toyworld.methods`` registers the steered methods and the peers. Every
score is computed from scenes generated from ``seed``, so any seed gives a fresh held-out set and
the same seed gives the same numbers.

``decoding="sample"`` runs every method under T = 1 sampling (the papers' protocol): evaluate
switches the method's ``HFDecoder`` to ``SAMPLING``, so methods need not know about it. Each
sampled batch seeds torch from ``sample_seed`` and its first item's id, so answers are the same
on every rerun, in any method order, and after a resume.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from ..core.chair import ChairScorer
from ..core.decoder import Decoder, HFDecoder
from ..core.methods import SAMPLING, get_method
from ..core.pope import parse_first_word, pope_scores
from ..reproduce.journal import AnswerLog, atomic_write
from .language import EVAL_DESCRIBE_PROMPT
from .pope import SPLITS, pope_questions
from .world import CLASS_NAMES, CLASSES, class_synonyms, heldout_scenes, partner_of

DECODINGS = ("greedy", "sample")
logger = logging.getLogger(__name__)
"""The run's log file's lines (``eval_suites.run_log``); ``log`` is a run's answers."""


def sampling(decoder: Decoder) -> HFDecoder:
    """A copy of a method's decoder that samples at T = 1 (its other kwargs, hooks, kept)."""
    if not isinstance(decoder, HFDecoder):
        raise TypeError(f"{type(decoder).__name__} is not an HFDecoder, so evaluate cannot "
                        "switch it to sampling")
    sampled = copy.copy(decoder)
    sampled.kwargs = {**decoder.kwargs, **SAMPLING}
    return sampled


@dataclass
class EvalSettings:
    seed: int = 1
    n_images: int = 200
    batch_size: int = 32
    caption_tokens: int = 48
    answer_tokens: int = 3
    model_path: str | None = None
    decoding: str = "greedy"
    """"greedy", or "sample": every method at T = 1 (``SAMPLING``)."""
    sample_seed: int = 55
    """Seeds each sampled batch (also of the ``sample`` method under greedy decoding)."""


def _run(decoder: Decoder, log: AnswerLog, ids: list[str], items: list[tuple[Image.Image, str]],
         max_new_tokens: int, batch: int, desc: str, seed: int | None) -> list[str]:
    """Answer texts of ``items``; ``log`` holds those already answered and takes the others.
    ``seed``: seed torch before each batch from it and the batch's first id."""

    def generate(indices: list[int]) -> list[dict]:
        if seed is not None:
            torch.manual_seed(zlib.crc32(f"{seed}/{ids[indices[0]]}".encode()))
        chunk = [items[i] for i in indices]
        out = decoder.generate([im for im, _ in chunk], [p for _, p in chunk], max_new_tokens)
        return [{"id": ids[i], "text": text, "n_tokens": n} for i, (text, n) in zip(indices, out)]

    return [row["text"] for row in log.answer(ids, batch, generate, desc)]


def chair_scorer() -> ChairScorer:
    """The toy world's CHAIR: each object counted once per caption (``per_mention=False``), as
    every toy-world number reported so far."""
    return ChairScorer({CLASS_NAMES[c]: class_synonyms(c) for c in range(len(CLASSES))},
                       per_mention=False)


def absent_partners(classes: tuple[int, ...]) -> set[str]:
    """Names of the co-occurring partners missing from a scene (what the prior invites)."""
    return {CLASS_NAMES[p] for c in classes
            if (p := partner_of(c)) is not None and p not in classes}


def default_model_path() -> str:
    from .assets_paths import toy_paths

    return str(toy_paths().llava)


def load_model(path: str | None = None) -> tuple[LlavaForConditionalGeneration, AutoProcessor]:
    """The LLaVA in folder ``path`` (default: the shipped toy) and its processor; a path that
    is no model folder, or holds another kind of model (the toy CLIP beside it), is refused by
    name before anything loads."""
    path = path or default_model_path()
    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"model {path}: " + ("no config.json in this folder"
                                                     if Path(path).is_dir() else "no such folder")
                                + "; give a LLaVA folder, such as the llava/ that `train` writes")
    fields = json.loads(config.read_text())
    if "n_concepts" in fields:  # it records the model it was trained for, as a LLaVA's would
        raise ValueError(f"model {path} is a concept space's folder (its config.json names the "
                         "model it was trained for); give a LLaVA folder, such as the llava/ "
                         "that `train` writes")
    if fields.get("model_type") != "llava" or not {"text_config", "vision_config"} <= set(fields):
        raise ValueError(f"model {path} is a {fields.get('model_type')!r} model; the toy world "
                         "decodes with a LLaVA (model_type 'llava'), such as the llava/ that "
                         "`train` writes")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)


def inputs_fingerprint(scenes: list, model_path: str | None, model=None) -> str:
    """sha256 (first 16 digits) of what answers depend on beyond the settings: the scenes
    (images and objects) and every file of the model's folder (weights, its space, readouts,
    steering.json), so that a run is not resumed after the world, the model or its space
    changed. With a ``model`` object given, that is its own weights as they are in memory and
    the folder it was loaded from (where ``attach`` finds its space), beside ``model_path`` if
    one is set: not the shipped toy's. A method's own code is not in it: after changing one,
    answer into a new folder."""
    digest = hashlib.sha256()
    for scene in scenes:
        digest.update(scene.image.tobytes())
        digest.update(repr(scene.scene.names).encode())
    if isinstance(model, torch.nn.Module):
        digest.update(weights_digest(model).encode())
    folders = ([model_path or default_model_path()] if model is None
               else [path for path in {model_path, getattr(model, "name_or_path", None)} if path])
    for folder in sorted(folders):
        _digest_folder(digest, folder)
    return digest.hexdigest()[:16]


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model as it is in memory: its config and every tensor of its state dict
    (names and bytes)."""
    digest = hashlib.sha256(model.config.to_json_string().encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _digest_folder(digest, model_path: str) -> None:
    """Every file of ``model_path`` (its relative name and content) into ``digest``; a hub id,
    which has no local files, by its name."""
    folder = Path(model_path)
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for file in files:
        with open(file, "rb") as handle:
            digest.update(f"{file.relative_to(folder)}:".encode()
                          + hashlib.file_digest(handle, "sha256").digest())
    if not files:  # a hub id: its name is all there is to go by
        digest.update(model_path.encode())


def evaluate(method: str, settings: EvalSettings, model=None, processor=None,
             answers: str | Path | None = None) -> dict:
    """Run ``method`` on the held-out scenes of ``settings.seed``; return the result dict.

    ``answers``: a JSONL file the answers are appended to as they come; if it holds answers of
    an interrupted run with the same method and settings, only the rest are generated.
    """
    factory = get_method(method)
    if settings.decoding not in DECODINGS:
        raise ValueError(f"unknown decoding {settings.decoding!r}; expected one of {DECODINGS}")
    scenes = heldout_scenes(settings.seed, settings.n_images)
    # fingerprinted only for a log on disk: a resume is what reads it back
    inputs = inputs_fingerprint(scenes, settings.model_path, model) if answers else None
    log = AnswerLog(Path(answers) if answers else None,
                    {"method": method, **asdict(settings), "inputs": inputs})
    if model is None:
        model, processor = load_model(settings.model_path)
    logger.info("%s: seed %d, %d images, %s decoding%s", method, settings.seed,
                settings.n_images, settings.decoding, f", answers in {answers}" if answers else "")
    torch.manual_seed(settings.seed)
    images = [s.image for s in scenes]
    result: dict = {"method": method, "seed": settings.seed, "n_images": settings.n_images,
                    "decoding": settings.decoding, "sample_seed": settings.sample_seed, "pope": {}}
    with factory(model, processor) as decoder:
        if settings.decoding == "sample":
            decoder = sampling(decoder)
        samples = isinstance(decoder, HFDecoder) and decoder.kwargs.get("do_sample", False)
        seed = settings.sample_seed if samples else None
        # POPE: ask each distinct (image, question) once, score it in every split that holds it.
        rows = {split: pope_questions([s.scene.classes for s in scenes], split, settings.seed)
                for split in SPLITS}
        # Sorted by question, then image: neighbouring rows of a batch show different images
        # (the wrong-image control steers each row with its neighbour's image).
        keys = sorted({(r["image_index"], r["question"])
                       for split_rows in rows.values() for r in split_rows},
                      key=lambda k: (k[1], k[0]))
        replies = _run(decoder, log, [f"pope/{i}/{q}" for i, q in keys],
                       [(images[i], q) for i, q in keys], settings.answer_tokens,
                       settings.batch_size, f"{method} POPE", seed)
        reply = {k: parse_first_word(a) for k, a in zip(keys, replies)}
        for split, split_rows in rows.items():
            result["pope"][split] = pope_scores(
                [reply[(r["image_index"], r["question"])] for r in split_rows],
                [r["answer"] for r in split_rows])
        captions = _run(decoder, log, [f"chair/{i}" for i in range(len(images))],
                        [(im, EVAL_DESCRIBE_PROMPT) for im in images], settings.caption_tokens,
                        settings.batch_size, f"{method} CHAIR", seed)
    scorer = chair_scorer()
    truths = [set(s.scene.names) for s in scenes]
    result["chair"] = scorer.score(captions, truths)
    broken = [i for i, s in enumerate(scenes) if s.scene.broken_pair]
    sub = scorer.score([captions[i] for i in broken], [truths[i] for i in broken])
    named_partner = [bool(absent_partners(scenes[i].scene.classes)
                          & set(scorer.mentions(captions[i]))) for i in broken]
    result["chair"]["broken_pair"] = {**sub,
                                      "partner_rate": sum(named_partner) / max(len(broken), 1)}
    result["seconds_per_token"] = log.seconds / max(log.tokens, 1)
    result["generated_tokens"] = log.tokens
    result["settings"] = asdict(settings)
    result["examples"] = [{"objects": list(scenes[i].scene.names), "caption": captions[i]}
                          for i in range(min(6, len(scenes)))]
    logger.info("%s: %s", method, result_line(result))
    return result


def result_line(result: dict) -> str:
    """An ``evaluate`` result in one line: each POPE split's F1, CHAIR and the cost."""
    chair = result["chair"]
    pope = ", ".join(f"{split} {scores['f1']:.3f}" for split, scores in result["pope"].items())
    return (f"POPE F1 {pope}; CHAIR_S {chair['chair_s']:.3f}, CHAIR_I "
            f"{format_score(chair['chair_i'])}, recall {chair['recall']:.3f}; "
            f"{result['seconds_per_token'] * 1000:.2f} ms per token")


def format_score(value: float | None) -> str:
    """A score to three places, "-" where it is undefined (CHAIR_I of captions naming nothing,
    a ratio without greedy)."""
    return "-" if value is None else f"{value:.3f}"


def write_json(result: dict, path: str | Path) -> None:
    """Write ``result`` to ``path`` atomically (an interrupted run leaves no half file)."""
    atomic_write(Path(path), json.dumps(result, indent=2) + "\n")
