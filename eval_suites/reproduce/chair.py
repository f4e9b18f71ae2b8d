"""The VL-SAE paper's CHAIR protocol: 500 COCO val2014 images described in detail, then scored.

Image choice, the reference's way: the file names of the image folder (``os.listdir``, sorted
here so the order does not depend on the file system), shuffled by ``random.seed(55)`` +
``random.shuffle``, first 500 kept (``select_chair_images``). Prompt "Please describe this image
in detail.", up to 512 new tokens, sampling as for POPE. Captions are scored by our
``eval_suites.core.chair.ChairScorer`` (no NLTK downloads; every mention counted, with CHAIR's
rules for COCO's qualifiers, ``COCO_ALIASES``) against per-image ground truth: from
COCO's ``instances_val2014.json`` (``coco_ground_truth``) or a JSON of image -> object names, with a
synonyms file (JSON object -> phrases, or CHAIR's ``synonyms.txt``: one object per line, its name
first, then its synonyms, comma-separated).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from pathlib import Path

import transformers

from ..core.chair import ChairScorer
from .journal import AnswerLog
from .runner import open_run, settings_markdown, write_report
from .settings import REFERENCE_SEED, RunSettings

CHAIR_PROMPT = "Please describe this image in detail."
CHAIR_MAX_NEW_TOKENS = 512
CHAIR_ALPHA = 0.7
CHAIR_N_IMAGES = 500
_CHAIR_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
                  "giraffe", "animal", "cub")
COCO_ALIASES = {**{f"{qualifier} {animal}": animal for animal in _CHAIR_ANIMALS
                   for qualifier in ("baby", "adult")},
                "passenger jet": "jet", "passenger train": "train", "bow tie": "tie",
                "toilet seat": "toilet"}
"""CHAIR's own rules for COCO (its chair.py): a qualifier that is a person's synonym ("baby
elephant", "passenger train") stands for the object it qualifies, not for a person."""
COCO_DROPPED = {"seat": "toilet"}
"""CHAIR's other rule: "seat" in a caption that names a toilet is the toilet's, not a chair."""


def select_chair_images(images: Path, n: int = CHAIR_N_IMAGES,
                        seed: int = REFERENCE_SEED) -> list[str]:
    """The reference's selection: sorted listing, ``random.seed(seed); random.shuffle``, first n.

    A private ``random.Random(seed)`` draws exactly what the module-level calls draw, without
    touching the global generator.
    """
    names = sorted(os.listdir(images))
    random.Random(seed).shuffle(names)
    return names[:n]


def read_json(path: str | Path, what: str):
    """The JSON in ``path``; a damaged file is named, with what it should hold, since the
    parser's own message gives only a line and column."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(f"{path} is not valid JSON ({err}); it should hold {what}: fix or "
                         "replace the file") from None


def coco_ground_truth(instances_json: str | Path) -> dict[str, set[str]]:
    """COCO instances file -> {image file name: names of the categories annotated in it}."""
    data = read_json(instances_json, "COCO's instances_val2014.json")
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        raise ValueError(f"{instances_json} is not a COCO instances file: it lacks {missing}")
    category = {c["id"]: c["name"] for c in data["categories"]}
    file_name = {image["id"]: image["file_name"] for image in data["images"]}
    truth: dict[str, set[str]] = {name: set() for name in file_name.values()}
    for annotation in data["annotations"]:
        truth[file_name[annotation["image_id"]]].add(category[annotation["category_id"]])
    return truth


def read_ground_truth(path: str | Path) -> dict[str, set[str]]:
    """A JSON object {image id or file name: [object names]} (the toy-world export's format)."""
    data = read_json(path, "a JSON object {image: [object names]}")
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"{path} should map each image to a list of object names")
    return {image: set(objects) for image, objects in data.items()}


def read_synonyms(path: str | Path) -> dict[str, list[str]]:
    """Object -> phrases, from JSON or from CHAIR's ``synonyms.txt`` (name, syn, syn, ... per
    line)."""
    path = Path(path)
    if path.suffix == ".json":
        data = read_json(path, "a JSON object {object: [phrases]}")
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise ValueError(f"{path} should map each object name to a list of phrases")
        return data
    synonyms: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        phrases = [p.strip() for p in line.split(",") if p.strip()]
        if phrases:
            synonyms.setdefault(phrases[0], []).extend(phrases[1:])
    return synonyms


def truth_of(name: str, truth: dict[str, set[str]]) -> set[str] | None:
    """Ground truth of an image file, keyed by its file name or by its stem (None if absent)."""
    return truth.get(name, truth.get(Path(name).stem))


def chair_selection(images: Path, n_images: int, seed: int) -> list[str]:
    """``select_chair_images``, refusing to score nothing (a perfect CHAIR from no caption) and
    saying on stderr when the folder holds fewer images than asked for."""
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    chosen = select_chair_images(images, n_images, seed)
    if not chosen:
        raise ValueError(f"{images} holds no images; pass the COCO val2014 folder as --images")
    if len(chosen) < n_images:
        print(f"warning: {images} holds only {len(chosen)} images, fewer than the {n_images} "
              f"asked for (--n-images): scoring {len(chosen)}", file=sys.stderr, flush=True)
    return chosen


def run_chair(settings: RunSettings, images: Path, truth: dict[str, set[str]],
              synonyms: dict[str, list[str]], out: Path, n_images: int = CHAIR_N_IMAGES,
              prompt: str = CHAIR_PROMPT) -> dict:
    """Describe the selected images, score them, write ``out/chair.{json,md}`` and the captions.

    Captions are appended to ``out/chair.captions.jsonl`` as they come; rerun the same command
    after a kill and it describes only the images not in there yet.
    ``prompt`` is the reference's; change it only for a model trained on other prompts.
    """
    chosen = chair_selection(images, n_images, settings.seed)
    selected = chosen[:settings.limit]
    truths = [truth_of(name, truth) for name in selected]
    no_truth = [name for name, objects in zip(selected, truths) if objects is None]
    if no_truth:
        raise ValueError(f"{len(no_truth)} selected images have no ground truth, e.g. "
                         f"{no_truth[:3]}; is the image folder the one the annotations describe?")
    unknown = sorted(set().union(*truths) - set(synonyms))
    if unknown:
        raise ValueError(f"ground-truth objects {unknown[:10]} are not in the synonyms file")
    scorer = ChairScorer(synonyms, aliases=COCO_ALIASES, dropped=COCO_DROPPED)
    scoring = json.dumps([sorted(truth_of(name, truth) or ()) for name in chosen] + [synonyms],
                         sort_keys=True)  # what the logged rows' object lists come from
    log = AnswerLog(out / "chair.captions.jsonl", settings.resume_key(
        protocol="chair", images=str(images), n_images=n_images, prompt=prompt,
        scoring_sha256=hashlib.sha256(scoring.encode()).hexdigest()), key="image")

    def caption_row(i: int, text: str, n_tokens: int) -> dict:
        named = scorer.all_mentions(text)
        return {"image": selected[i], "caption": text, "n_tokens": n_tokens, "mentioned": named,
                "hallucinated": [o for o in named if o not in truths[i]],
                "ground_truth": sorted(truths[i])}

    with open_run(settings) as run:
        transformers.set_seed(settings.seed)
        rows = run.answer(log, selected, [(images / name, prompt) for name in selected],
                          caption_row, settings.max_new_tokens, desc="CHAIR")
        scores = scorer.score([row["caption"] for row in rows], truths)
        report = {"protocol": "chair", "images": str(images), "n_images": len(chosen),
                  "n_requested": n_images, "selected": selected, "prompt": prompt,
                  "results": scores,
                  **run.record(settings)}
    write_report(out, "chair", report, chair_markdown(report))
    return report


def _percent(value: float | None) -> str:
    """A rate in percent, "-" where it is undefined (CHAIR_I of captions naming nothing)."""
    return "-" if value is None else f"{100 * value:.1f}"


def chair_markdown(report: dict) -> str:
    s = report["results"]
    lines = [f"# CHAIR: {report['settings']['method']} on {report['settings']['model']}", "",
             "| images | CHAIR_S | CHAIR_I | recall | mean length (words) |",
             "|---|---|---|---|---|",
             f"| {s['n']} | {100 * s['chair_s']:.1f} | {_percent(s['chair_i'])} | "
             f"{100 * s['recall']:.1f} | {s['mean_len']:.1f} |", "",
             f"Images: the first {len(report['selected'])} of {report['images']} after sorting "
             f"and shuffling with seed {report['settings']['seed']} (list in chair.json).", ""]
    if report["n_images"] < report["n_requested"]:
        lines[-1:-1] = ["", f"**Only {report['n_images']} images of the "
                            f"{report['n_requested']} asked for were in the folder.**"]
    return "\n".join(lines) + settings_markdown(report)
