"""What ``box_data`` reads from COCO instances, Visual Genome and synonym files, read directly
(the ``patch-readout`` command on them: ``test_grounding_readout*.py``), and the files it
refuses, each with what was wrong and what to pass instead."""

import json
import logging

import pytest

from sae_training.box_data import (
    BoxedImage,
    add_attribute_boxes,
    check_image_files,
    image_ids,
    read_coco,
    read_synonyms,
    read_vg_attributes,
)
from sae_training.samples import DataError

CATEGORIES = [{"id": 5, "name": " dog "}, {"id": 2, "name": "cat"}]  # listed out of id order


def coco(folder, annotations, images=None, categories=CATEGORIES, **extra):
    """An instances json of ``images`` (default: ids 1..6, 60 x 40) and ``annotations``
    (image id, category id, bbox)."""
    images = images if images is not None else [
        {"id": i, "file_name": f"{i:012d}.jpg", "width": 60, "height": 40} for i in range(1, 7)]
    path = folder / "instances.json"
    path.write_text(json.dumps({
        "images": images, "categories": categories, **extra, "annotations": [
            {"image_id": i, "category_id": c, "bbox": b} for i, c, b in annotations]}))
    return path


def test_coco_images_come_by_id_with_their_sized_boxes_and_empty_boxes_dropped(tmp_path,
                                                                              caplog):
    path = coco(tmp_path, [(4, 2, [1, 2, 3, 4]), (2, 5, [0, 0, 10, 5]), (4, 5, [5, 5, 0, 3]),
                           (3, 2, [1, 1, 2, 0]),  # image 3: only a box without area
                           (5, 2, [0, 0, 1, 1]), (6, 5, [2, 2, 2, 2]), (2, 2, [7, 8, 1, 2])])
    with caplog.at_level(logging.INFO, logger="sae_training.box_data"):
        categories, images = read_coco(path, tmp_path / "img")
    assert f"{path}: left out 2 box(es) of no area (width or height 0)" in caplog.messages
    assert categories == ["cat", "dog"]  # by id, names stripped
    assert images == [
        BoxedImage("2", tmp_path / "img" / "000000000002.jpg", (60, 40),
                   ((0.0, 0.0, 10.0, 5.0), (7.0, 8.0, 8.0, 10.0)), (("dog",), ("cat",)),
                   ((), ())),
        BoxedImage("4", tmp_path / "img" / "000000000004.jpg", (60, 40),
                   ((1.0, 2.0, 4.0, 6.0),), (("cat",),), ((),)),
        BoxedImage("5", tmp_path / "img" / "000000000005.jpg", (60, 40),
                   ((0.0, 0.0, 1.0, 1.0),), (("cat",),), ((),)),
        BoxedImage("6", tmp_path / "img" / "000000000006.jpg", (60, 40),
                   ((2.0, 2.0, 4.0, 4.0),), (("dog",),), ((),))]
    # the limit counts the images kept, after those in keep and not in skip are chosen
    assert [i.key for i in read_coco(path, "img", 2, keep={4, 5, 6}, skip={5})[1]] == ["4", "6"]


@pytest.mark.parametrize("content, message", [
    ('{"images": [', r"is not valid JSON \(.*\); is the download complete\?"),
    ({"images": [], "annotations": [], "categories": []}, "has no categories: it is not a COCO "
     r"instances file \(use instances_train2017.json"),
    ({"images": [], "categories": CATEGORIES}, r"is not a COCO instances file: it lacks "
     r"\['annotations'\]"),
    ({"images": [], "annotations": [], "categories": [{"id": 1}]},
     "a category needs id and name, an image id, file_name, width and height"),
    ({"images": [{"id": 1}], "annotations": [{"image_id": 1, "category_id": 5}],
      "categories": CATEGORIES}, r"annotation 0 needs image_id, category_id and bbox"),
    ({"images": [{"id": 1}], "annotations": [{"image_id": 1, "category_id": 9, "bbox": []}],
      "categories": CATEGORIES}, "annotation 0 names category 9, which the file does not list"),
    ({"images": [{"id": 1}], "annotations": [{"image_id": 7, "category_id": 5, "bbox": []}],
      "categories": CATEGORIES}, "annotation 0 is of image 7, which the file does not list"),
    ({"images": [{"id": 1}], "annotations": [{"image_id": 1, "category_id": 5,
                                              "bbox": [0, 0, 2, 2, 2]}],
      "categories": CATEGORIES}, r"annotation 0: a box must be \[x, y, w, h\] numbers, got "
     r"\[0, 0, 2, 2, 2\]"),
    ({"images": [{"id": 1}], "annotations": [{"image_id": 1, "category_id": 5,
                                              "bbox": [0, 0, float("inf"), 2]}],
      "categories": CATEGORIES}, r"a box must be \[x, y, w, h\] numbers, got \[0, 0, inf, 2\]"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [
        {"image_id": 1, "category_id": 5, "bbox": [0, 0, 2, 2]}], "categories": CATEGORIES},
     r"image 1 needs file_name, width and height \(KeyError\('width'\)\)")])
def test_a_file_that_is_no_coco_instances_file_is_refused(tmp_path, content, message):
    path = tmp_path / "instances.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError, match=message):
        read_coco(path, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nowhere.json does not exist: pass a COCO "
                                                r"instances json \(annotations/instances_"):
        read_coco(tmp_path / "nowhere.json", tmp_path)


def test_exclude_reads_the_ids_of_any_coco_json(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": [{"id": 3}, {"id": 9}], "annotations": []}))
    assert image_ids(path) == {3, 9}
    path.write_text(json.dumps({"images": {"id": 3}}))
    with pytest.raises(DataError, match="lists no images: --exclude takes a COCO json"):
        image_ids(path)
    path.write_text(json.dumps({"images": ["3.jpg"]}))
    with pytest.raises(DataError, match=r"captions.json: each of its images needs a numeric id, "
                                        r"as a COCO json's do \(TypeError"):
        image_ids(path)


def test_missing_image_files_are_refused_naming_three(tmp_path):
    images = [BoxedImage(str(i), tmp_path / f"{i}.jpg", (4, 4), (), (), ()) for i in range(5)]
    (tmp_path / "2.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"^4 of the 5 images the annotations name are not in "
                                        rf"{tmp_path} \(e\.g\. 0\.jpg, 1\.jpg, 3\.jpg\): pass "):
        check_image_files(images, tmp_path)
    for name in ("0", "1", "3"):
        (tmp_path / f"{name}.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"^1 of the 5 images .* \(e\.g\. 4\.jpg\)"):
        check_image_files(images, tmp_path)
    check_image_files(images[:4], tmp_path)


def test_synonyms_come_from_chairs_text_or_a_json_object(tmp_path):
    text = tmp_path / "synonyms.txt"
    text.write_text("dog, puppy,, hound \n\n cat ,kitten\ndog, pup\n")
    assert read_synonyms(text) == {"dog": ["puppy", "hound", "pup"], "cat": ["kitten"]}
    mapping = tmp_path / "synonyms.json"
    mapping.write_text(json.dumps({" dog": [" puppy "], "cat": []}))
    assert read_synonyms(mapping) == {"dog": ["puppy"], "cat": []}
    mapping.write_text(json.dumps({"dog": "puppy"}))
    with pytest.raises(DataError, match="should map each category name to a list of words"):
        read_synonyms(mapping)
    with pytest.raises(FileNotFoundError, match=r"none.txt does not exist: pass --synonyms a "
                                                r"json \{category: \[words\]\} or CHAIR's"):
        read_synonyms(tmp_path / "none.txt")


def vg_files(folder, images, attributes):
    (folder / "image_data.json").write_text(json.dumps(images))
    (folder / "attributes.json").write_text(json.dumps(attributes))
    return folder / "attributes.json", folder / "image_data.json"


def test_visual_genome_boxes_of_coco_images_are_read_and_rescaled(tmp_path, caplog):
    files = vg_files(tmp_path, [{"image_id": 1, "coco_id": 4, "width": 120, "height": 160},
                                {"id": 2, "coco_id": 6, "width": 30, "height": 20},  # VG 1.0
                                {"image_id": 3, "coco_id": None, "width": 9, "height": 9}],
                     [{"image_id": 1, "attributes": [
                         {"x": 12, "y": 8, "w": 6, "h": 40, "attributes": ["Red", " tall"]},
                         {"x": 0, "y": 0, "w": 0, "h": 5, "attributes": ["red"]},  # no area
                         {"x": 1, "y": 1, "w": 1, "h": 1, "attributes": ["wooden"]}]},
                      {"id": 2, "attributes": [{"x": 1, "y": 1, "w": 2, "h": 2}]},
                      {"image_id": 3, "attributes": [  # not a COCO image: left out
                          {"x": 1, "y": 1, "w": 2, "h": 2, "attributes": ["red"]}]}])
    with caplog.at_level(logging.INFO, logger="sae_training.box_data"):
        vg = read_vg_attributes(*files, ["RED ", "tall"])
    assert caplog.messages == [
        f"{files[0]}: left out 1 attribute box(es) of no area (width or height 0)"]
    assert vg == {4: ((120, 160), [((12.0, 8.0, 18.0, 48.0), ("red", "tall"))]),
                  6: ((30, 20), [])}  # a COCO image without the words asked: a negative
    path = coco(tmp_path, [(4, 2, [1, 2, 3, 4]), (5, 5, [0, 0, 1, 1]), (6, 5, [2, 2, 2, 2])])
    merged = add_attribute_boxes(read_coco(path, tmp_path)[1], vg)  # COCO's: 60 x 40
    assert [(i.key, i.boxes, i.objects, i.attributes) for i in merged] == [
        ("4", ((1.0, 2.0, 4.0, 6.0), (6.0, 2.0, 9.0, 12.0)), (("cat",), ()),
         ((), ("red", "tall"))),
        ("6", ((2.0, 2.0, 4.0, 4.0),), (("dog",),), ((),))]


VG_IMAGE = {"image_id": 1, "coco_id": 4, "width": 9, "height": 9}


@pytest.mark.parametrize("which", ["attributes", "image_data"])
def test_visual_genome_files_that_are_no_lists_are_refused(tmp_path, which):
    files = vg_files(tmp_path, [VG_IMAGE], [])
    (tmp_path / f"{which}.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match=rf"{which}.json should be a list of images \(Visual "
                                        rf"Genome {which}.json\)"):
        read_vg_attributes(*files, ["red"])


@pytest.mark.parametrize("images, attributes, message", [
    ([{"image_id": 1, "attributes": []}], [], r"image_data.json names no COCO image \(none of "
     r"its images has a coco_id\): pass --vg-images Visual Genome's image_data.json"),
    ([{**VG_IMAGE, "height": None}], [], r"image_data.json, image 0: a Visual Genome image "
     r"needs image_id, coco_id, width and height \(TypeError"),
    ([VG_IMAGE, "2.jpg"], [], r"image_data.json, image 1: a Visual Genome image needs"),
    ([VG_IMAGE], [{"image_id": 1, "attributes": {"x": 1}}], r"attributes.json, image 0 is no "
     r"Visual Genome image with a list of attributes: pass --attributes Visual Genome's"),
    ([VG_IMAGE], [{"image_id": 1, "attributes": ["red"]}], r"attributes.json, image 1: 'red' "
     r"is no Visual Genome object \(x, y, w, h and a list of attributes\): pass --attributes"),
    ([VG_IMAGE], [{"image_id": 1, "attributes": [{"x": 1, "y": 1, "w": 2, "h": 2,
                                                  "attributes": "red"}]}],  # not letters
     r"attributes.json, image 1: .* is no Visual Genome object"),
    ([VG_IMAGE], [{"image_id": "one", "attributes": []}], r"attributes.json, image 0: a Visual "
     r"Genome image's image_id must be a number, got 'one'")])
def test_visual_genome_records_that_cannot_be_read_are_refused(tmp_path, images, attributes,
                                                               message):
    """As ``patch-readout`` refuses them (not with a traceback, nor as no image at all)."""
    with pytest.raises(DataError, match=message):
        read_vg_attributes(*vg_files(tmp_path, images, attributes), ["red"])
