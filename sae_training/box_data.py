"""Boxes that name words, for mode grounding's patch readout (``patch_readout.py``): COCO-format
instance annotations and Visual Genome attribute boxes on the images COCO shares with it.

COCO (``instances_train2017.json``): ``images`` (id, file_name, width, height), ``annotations``
(image_id, bbox [x, y, w, h] in pixels, category_id) and ``categories`` (id, name). Every
category is an object unit named by its name; ``read_synonyms`` adds spellings (CHAIR's list).
Visual Genome (``attributes.json`` and ``image_data.json``): objects with a box (x, y, w, h) and
the attributes annotated on them, on images with a ``coco_id``; its boxes are rescaled to the
COCO image's size. VG annotates attributes sparsely (a red car is not always marked "red"), so
its negatives are noisier than COCO's, whose 80 categories are annotated exhaustively.

Where the boxes land in the image the vision tower sees: ``frame_map.py``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sae_training.samples import DataError

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
"""(x0, y0, x1, y1) in pixels."""
COCO_IMAGES = "http://images.cocodataset.org/zips/train2017.zip"
COCO_ANNOTATIONS = "http://images.cocodataset.org/annotations/annotations_trainval2017.zip"


@dataclass(frozen=True)
class BoxedImage:
    """One image file and its boxes, each with the names of the units it shows."""

    key: str
    """The image's id in the annotations."""
    path: Path
    """The image file."""
    size: tuple[int, int]
    """(width, height) in pixels, as the annotations give it."""
    boxes: tuple[Box, ...]
    """Each box, (x0, y0, x1, y1) in pixels of the original image."""
    objects: tuple[tuple[str, ...], ...]
    """The object units each box shows: its COCO category's name (none for an attribute box)."""
    attributes: tuple[tuple[str, ...], ...]
    """The attribute words each box shows (Visual Genome's; none for a COCO box)."""


def _load(path: str | Path, what: str) -> object:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON ({error}); is the download complete?") from None


def _xywh(bbox: object, where: str) -> Box | None:
    """A COCO / VG [x, y, w, h] box as (x0, y0, x1, y1); None when it has no area."""
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
        raise DataError(f"{where}: a box must be [x, y, w, h] numbers, got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    return (x, y, x + w, y + h) if w > 0 and h > 0 else None


def read_coco(instances: str | Path, images: str | Path, limit: int | None = None,
              keep: set[int] | None = None, skip: set[int] = frozenset()
              ) -> tuple[list[str], list[BoxedImage]]:
    """The category names (by id) and the images that have a box, by image id, the first
    ``limit`` of them (of those in ``keep``, if given, and not in ``skip``). An image without a
    box is left out."""
    data = _load(instances, "a COCO instances json (annotations/instances_train2017.json "
                            f"from {COCO_ANNOTATIONS})")
    if not isinstance(data, dict) or not data.get("categories"):
        raise DataError(f"{instances} has no categories: it is not a COCO instances file (use "
                        "instances_train2017.json, not captions_* or person_keypoints_*)")
    missing = [key for key in ("images", "annotations") if key not in data]
    if missing:
        raise DataError(f"{instances} is not a COCO instances file: it lacks {missing}")
    try:
        categories = {int(c["id"]): str(c["name"]).strip() for c in data["categories"]}
        records = {int(i["id"]): i for i in data["images"]}
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"{instances}: a category needs id and name, an image id, file_name, "
                        f"width and height ({error!r})") from None
    by_image: dict[int, list[tuple[Box, tuple[str, ...]]]] = {}
    empty = 0
    for n, annotation in enumerate(data["annotations"]):
        where = f"{instances}, annotation {n}"
        try:
            image, category = int(annotation["image_id"]), int(annotation["category_id"])
            bbox = annotation["bbox"]
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{where} needs image_id, category_id and bbox ({error!r})") from None
        if category not in categories:
            raise DataError(f"{where} names category {category}, which the file does not list")
        if image not in records:
            raise DataError(f"{where} is of image {image}, which the file does not list")
        box = _xywh(bbox, where)
        if box is None:
            empty += 1
        else:
            by_image.setdefault(image, []).append((box, (categories[category],)))
    if empty:
        log.info("%s: left out %d box(es) of no area (width or height 0)", instances, empty)
    chosen = [i for i in sorted(by_image)
              if (keep is None or i in keep) and i not in skip][:limit]
    boxed = []
    for image in chosen:
        record = records[image]
        try:
            size = (int(record["width"]), int(record["height"]))
            path = Path(images) / str(record["file_name"])
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{instances}: image {image} needs file_name, width and height "
                            f"({error!r})") from None
        boxes, names = zip(*by_image[image])
        boxed.append(BoxedImage(str(image), path, size, boxes, names, ((),) * len(boxes)))
    return [categories[c] for c in sorted(categories)], boxed


def image_ids(path: str | Path) -> set[int]:
    """The ids of the images a COCO json lists (instances, captions: any with ``images``)."""
    data = _load(path, "--exclude a COCO json (e.g. annotations/instances_val2014.json)")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path} lists no images: --exclude takes a COCO json with 'images'")
    try:
        return {int(image["id"]) for image in data["images"]}
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"{path}: each of its images needs a numeric id, as a COCO json's do "
                        f"({error!r})") from None


def check_image_files(images: Sequence[BoxedImage], folder: str | Path) -> None:
    """Refuse a selection whose image files are not all in place, naming a few."""
    missing = [image.path for image in images if not image.path.is_file()]
    if missing:
        shown = ", ".join(p.name for p in missing[:3])
        raise DataError(f"{len(missing)} of the {len(images)} images the annotations name are "
                        f"not in {folder} (e.g. {shown}): pass --images the folder that holds "
                        f"them (COCO 2017 train: train2017/ from {COCO_IMAGES}), or lower "
                        "--limit to the images you have")


def read_synonyms(path: str | Path) -> dict[str, list[str]]:
    """Category -> more words for it: a json object, or CHAIR's ``synonyms.txt`` (the
    category, then its synonyms, comma-separated, one category a line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass --synonyms a json "
                                "{category: [words]} or CHAIR's synonyms.txt")
    if path.suffix == ".json":
        data = _load(path, "--synonyms")
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise DataError(f"{path} should map each category name to a list of words")
        return {str(k).strip(): [str(w).strip() for w in v] for k, v in data.items()}
    synonyms: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        words = [w.strip() for w in line.split(",") if w.strip()]
        if words:
            synonyms.setdefault(words[0], []).extend(words[1:])
    return synonyms


def read_vg_attributes(attributes: str | Path, image_data: str | Path,
                       words: Iterable[str]) -> dict[int, tuple[tuple[int, int],
                                                               list[tuple[Box, tuple[str, ...]]]]]:
    """COCO image id -> (the Visual Genome image's (width, height), its boxes with the
    attributes among ``words`` they show, lower-cased), for the VG images that are COCO images.
    Words match the annotation's whole attribute, lower-cased and stripped."""
    wanted = {w.strip().lower() for w in words}
    info = _load(image_data, "Visual Genome's image_data.json")
    if not isinstance(info, list):
        raise DataError(f"{image_data} should be a list of images (Visual Genome image_data.json)")
    coco_of: dict[int, tuple[int, tuple[int, int]]] = {}
    for n, record in enumerate(info):
        try:
            if record.get("coco_id") is not None:
                image = int(record.get("image_id", record.get("id", -1)))
                coco_of[image] = (int(record["coco_id"]), (int(record["width"]),
                                                           int(record["height"])))
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise DataError(f"{image_data}, image {n}: a Visual Genome image needs image_id, "
                            f"coco_id, width and height ({error!r})") from None
    if not coco_of:
        raise DataError(f"{image_data} names no COCO image (none of its images has a coco_id): "
                        "pass --vg-images Visual Genome's image_data.json (version 1.2), and "
                        "--attributes its attributes.json")
    data = _load(attributes, "Visual Genome's attributes.json")
    if not isinstance(data, list):
        raise DataError(f"{attributes} should be a list of images (Visual Genome "
                        "attributes.json)")
    found: dict[int, tuple[tuple[int, int], list[tuple[Box, tuple[str, ...]]]]] = {}
    empty = 0
    for n, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("attributes") or [], list):
            raise DataError(f"{attributes}, image {n} is no Visual Genome image with a list of "
                            "attributes: pass --attributes Visual Genome's attributes.json")
        image = _vg_id(entry, f"{attributes}, image {n}")
        if image not in coco_of:
            continue
        coco, size = coco_of[image]
        boxes = found.setdefault(coco, (size, []))[1]
        for obj in entry.get("attributes") or []:
            if not isinstance(obj, dict) or not isinstance(obj.get("attributes") or [], list):
                raise DataError(f"{attributes}, image {image}: {str(obj)[:60]!r} is no Visual "
                                "Genome object (x, y, w, h and a list of attributes): pass "
                                "--attributes Visual Genome's attributes.json")
            shown = tuple(sorted({str(a).strip().lower() for a in obj.get("attributes") or []}
                                 & wanted))
            box = _xywh([obj.get(k) for k in "xywh"], f"{attributes}, image {image}")
            if shown and box is None:
                empty += 1
            elif shown:
                boxes.append((box, shown))
    if empty:
        log.info("%s: left out %d attribute box(es) of no area (width or height 0)", attributes,
                 empty)
    return found


def _vg_id(record: dict, where: str) -> int:
    """A Visual Genome image's id (``image_id``; ``id`` in version 1.0)."""
    try:
        return int(record.get("image_id", record.get("id", -1)))
    except (TypeError, ValueError):
        raise DataError(f"{where}: a Visual Genome image's image_id must be a number, got "
                        f"{record.get('image_id', record.get('id'))!r}") from None


def add_attribute_boxes(images: Sequence[BoxedImage], vg: dict) -> list[BoxedImage]:
    """The images Visual Genome also annotates, each with its VG attribute boxes added,
    rescaled from the VG image's size to the COCO one's."""
    merged = []
    for image in images:
        if int(image.key) not in vg:
            continue
        (vg_w, vg_h), extra = vg[int(image.key)]
        sx, sy = image.size[0] / vg_w, image.size[1] / vg_h
        boxes = [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for (x0, y0, x1, y1), _ in extra]
        merged.append(BoxedImage(image.key, image.path, image.size, (*image.boxes, *boxes),
                                 (*image.objects, *((),) * len(extra)),
                                 (*image.attributes, *(words for _, words in extra))))
    return merged
