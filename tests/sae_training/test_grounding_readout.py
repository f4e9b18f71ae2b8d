"""The ``patch-readout`` command on the tiny LLaVA: COCO-format boxes (and Visual Genome
attribute boxes) read, the readout fitted, written and steered with; a killed extraction
resumed; bad inputs refused. (How boxes map into the processed frame: ``test_frame_map.py``.)"""

import json
import time

import pytest
import torch
from helpers.coco import run, tiny_space, write_coco
from PIL import Image
from safetensors.torch import load_file

from sae_training import patch_state_cache
from sae_training.box_data import (
    add_attribute_boxes,
    image_ids,
    read_coco,
    read_vg_attributes,
)
from sae_training.cli import main
from sae_training.samples import DataError
from vlsae_hooks import attach
from vlsae_hooks.patch_readout import PatchReadout
from vlsae_hooks.tensor_files import save_tensors

torch.set_num_threads(1)


def test_the_command_fits_a_readout_that_grounding_steers_with(llava, llava_dir, tmp_path):
    instances, images = write_coco(tmp_path)
    space = tiny_space(tmp_path / "space")
    synonyms = tmp_path / "synonyms.txt"
    synonyms.write_text("w10, w15, w16 w17\nw11\n")
    report = run(llava_dir, instances, images, space, "--synonyms", str(synonyms))
    readout = PatchReadout.load(space)
    tokenizer = llava[1].tokenizer
    assert (readout.d, readout.layer, readout.supervision) == (128, 0, "boxes")
    assert [u["name"] for u in report["units"]] == ["w10", "w11"]
    assert [u["tokens"] for u in report["units"]] == [["w10", "w15"], ["w11"]]
    assert readout.unit_token_ids.tolist() == [tokenizer.convert_tokens_to_ids(["w10", "w15"]),
                                               [tokenizer.convert_tokens_to_ids("w11"), -1]]
    assert not readout.is_attribute.any()
    assert {e["name"]: e["reason"].split(" (")[0] for e in report["left_out"]} == {
        "w12 w13": "no word of it", "w14": "no fitted image shows it"}
    assert (report["n_images"], report["n_fitted"], report["n_heldout"]) == (10, 8, 2)
    assert report["units"][0]["fitted_images"] == 8 and report["units"][1]["fitted_images"] == 4
    assert 0 <= report["heldout"]["patch_auc"] <= 1
    assert (space / "patch_readout.log").is_file()
    cache = tmp_path / "space.patch_states"
    assert sorted(p.name for p in cache.iterdir()) == [
        "manifest.json", "states_00000.safetensors", "states_00001.safetensors",
        "states_00002.safetensors"]
    model, processor = llava
    with attach(model, space, mode="grounding") as handle:
        assert handle.mode == "grounding"
        inputs = processor(images=[Image.open(next(images.iterdir()))],
                           text=["USER: <image> w5 ASSISTANT:"], return_tensors="pt")
        steered = model(**inputs).logits[0, -1]
    plain = model(**inputs).logits[0, -1]
    moved = (steered - plain).nonzero()[:, 0].tolist()
    assert moved and set(moved) <= set(tokenizer.convert_tokens_to_ids(["w10", "w15", "w11"]))

    captions = tmp_path / "captions"  # image-level labels only, beside: attach(readout=)
    report = run(llava_dir, instances, images, captions, "--captions-only", "--cache",
                 str(cache))  # the same states: nothing extracted
    assert PatchReadout.load(captions).supervision == "captions"
    assert report["heldout"]["patch_auc"] is None and report["units"][0]["fitted_patches"] is None
    with attach(model, space, mode="grounding", readout=str(captions)):
        pass


def test_a_killed_extraction_resumes_at_its_first_missing_chunk(llava_dir, tmp_path,
                                                                 monkeypatch):
    """The resumed report's extraction seconds were only the resumed run's."""
    instances, images = write_coco(tmp_path)
    clock = [0.0]  # each chunk's extraction takes 10 s on it
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    real = patch_state_cache.image_patch_states

    def counted(model, processor, chunk, *args, **kwargs):
        extracted.append(len(chunk))
        clock[0] += 10.0
        return real(model, processor, chunk, *args, **kwargs)

    extracted = []
    monkeypatch.setattr(patch_state_cache, "image_patch_states", counted)
    straight = run(llava_dir, instances, images, tmp_path / "straight")
    assert straight["seconds"]["extract"] == 30.0
    extracted = []

    def killed(model, processor, chunk, *args, **kwargs):
        if extracted:
            raise KeyboardInterrupt  # killed while extracting the second chunk
        return counted(model, processor, chunk, *args, **kwargs)

    monkeypatch.setattr(patch_state_cache, "image_patch_states", killed)
    with pytest.raises(SystemExit) as exit_info:
        run(llava_dir, instances, images, tmp_path / "resumed")
    assert exit_info.value.code == 130  # Ctrl-C: "interrupted; rerun the same command ..."
    cache = tmp_path / "resumed.patch_states"
    assert sorted(p.name for p in cache.iterdir()) == ["manifest.json",
                                                       "states_00000.safetensors"]

    monkeypatch.setattr(patch_state_cache, "image_patch_states", counted)
    resumed = run(llava_dir, instances, images, tmp_path / "resumed")
    assert extracted == [4, 4, 2]  # the first chunk once, then the two it had not reached
    assert resumed["seconds"]["extract"] == 30.0  # both runs', as the straight run's
    first = cache / "states_00000.safetensors"  # as a version that did not time chunks wrote
    save_tensors({"states": load_file(first)["states"]}, first,
                 metadata={"keys": json.dumps(["100", "101", "102", "103"])})
    refit = run(llava_dir, instances, images, tmp_path / "resumed")
    assert extracted == [4, 4, 2] and refit["seconds"]["extract"] is None
    assert refit["seconds"]["extract_unknown"].startswith(f"1 chunk(s) of {cache} were")
    for name in PatchReadout.TENSORS:
        assert torch.equal(getattr(PatchReadout.load(tmp_path / "straight"), name),
                           getattr(PatchReadout.load(tmp_path / "resumed"), name))
    assert resumed["units"] == straight["units"]


def test_coco_images_are_read_by_id_and_an_evaluation_split_is_left_out(tmp_path):
    instances, images = write_coco(tmp_path)
    categories, read = read_coco(instances, images, limit=3)
    assert categories == ["w10", "w11", "w12 w13", "w14"]
    assert [(i.key, i.size, i.objects) for i in read] == [
        ("100", (40, 56), (("w10",),)), ("101", (48, 40), (("w10",), ("w11",), ("w12 w13",))),
        ("102", (48, 40), (("w10",),))]
    assert read[1].boxes[1] == (20.0, 14.0, 36.0, 34.0)  # [x, y, w, h] -> (x0, y0, x1, y1)
    evaluated = tmp_path / "instances_val.json"  # as POPE's / CHAIR's val2014 images would be
    evaluated.write_text(json.dumps({"images": [{"id": 100}, {"id": 102}], "annotations": []}))
    _, kept = read_coco(instances, images, limit=3, skip=image_ids(evaluated))
    assert [i.key for i in kept] == ["101", "103", "104"]
    evaluated.write_text("{}")
    with pytest.raises(DataError, match="lists no images: --exclude takes a COCO json"):
        image_ids(evaluated)


def test_visual_genome_attribute_boxes_add_attribute_units(llava_dir, tmp_path):
    instances, images = write_coco(tmp_path)
    vg_images = [{"image_id": 7000 + n, "coco_id": 100 + n, "width": 96 if n % 3 else 80,
                  "height": 80 if n % 3 else 112} for n in range(8)]  # twice COCO's size
    vg_images.append({"image_id": 1, "coco_id": None, "width": 10, "height": 10})
    attributes = [{"image_id": 7000 + n, "attributes": [
        {"x": 2 * (4 + n % 5), "y": 12, "w": 36, "h": 20, "names": ["thing"],
         "attributes": ["W20 ", "shiny"]},
        {"x": 0, "y": 0, "w": 8, "h": 8, "attributes": ["w21"] if n % 2 else []}]}
        for n in range(8)]
    (tmp_path / "image_data.json").write_text(json.dumps(vg_images))
    (tmp_path / "attributes.json").write_text(json.dumps(attributes))
    vg = read_vg_attributes(tmp_path / "attributes.json", tmp_path / "image_data.json",
                            ["w20", "w21", "w22"])
    assert sorted(vg) == list(range(100, 108))
    _, coco = read_coco(instances, images)
    merged = add_attribute_boxes(coco, vg)
    assert len(merged) == 8 and merged[1].boxes[-2:] == ((5.0, 6.0, 23.0, 16.0),
                                                        (0.0, 0.0, 4.0, 4.0))
    assert merged[1].attributes == ((), (), (), ("w20",), ("w21",))  # COCO's three, VG's two
    assert merged[0].attributes == ((), ("w20",))  # its second VG object shows no word asked
    space = tmp_path / "readout"  # a folder of its own
    report = run(llava_dir, instances, images, space,
                 "--attributes", str(tmp_path / "attributes.json"),
                 "--vg-images", str(tmp_path / "image_data.json"),
                 "--attribute-words", "w20/w22,w21,w23")
    readout = PatchReadout.load(space)
    assert [(u["name"], u["kind"]) for u in report["units"]] == [
        ("w20", "attribute"), ("w10", "object"), ("w11", "object")]
    assert readout.is_attribute.tolist() == [True, False, False]
    assert report["n_images"] == 8
    left_out = {e["name"]: e["reason"] for e in report["left_out"]}
    assert left_out["w21"].startswith("none of its boxes")  # 2 x 2 px: below min_cover
    assert left_out["w23"] == "no fitted image shows it"


def test_bad_inputs_are_refused_with_what_to_do(llava_dir, tmp_path, capsys):
    instances, images = write_coco(tmp_path)
    (images / "000000000103.png").unlink()
    with pytest.raises(SystemExit, match=r"1 of the 10 images .* not in .*images \(e\.g\. "
                                         r"000000000103\.png\): pass --images"):
        run(llava_dir, instances, images, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused: no --space folder holding only a log
    assert run(llava_dir, instances, images, tmp_path / "out", "--limit", "3")["n_images"] == 3

    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": [], "annotations": [{"image_id": 1,
                                                                    "caption": "a dog"}]}))
    with pytest.raises(SystemExit, match="has no categories: it is not a COCO instances file"):
        run(llava_dir, captions, images, tmp_path / "out")
    with pytest.raises(SystemExit, match="nowhere.json does not exist"):
        run(llava_dir, tmp_path / "nowhere.json", images, tmp_path / "out")
    with pytest.raises(SystemExit, match=r"val2014.json does not exist: pass --exclude a COCO"):
        run(llava_dir, instances, images, tmp_path / "out",
            "--exclude", str(tmp_path / "val2014.json"))

    other = tiny_space(tmp_path / "other", d_model=64)
    files = sorted(other.iterdir())
    with pytest.raises(SystemExit, match=r"reads 64-wide states .* decoder is 128 wide: pass "
                                         "the model the space was trained for"):
        run(llava_dir, instances, images, other)
    assert sorted(other.iterdir()) == files  # no patch_readout.log (nor readout) left in it

    instances_data = json.loads(instances.read_text())
    instances_data["images"][0]["width"] = 50
    instances.write_text(json.dumps(instances_data))
    with pytest.raises(SystemExit, match=r"is 40 x 56 but the annotations say 50 x 56"):
        run(llava_dir, instances, images, tmp_path / "out", "--limit", "3",
            "--cache", str(tmp_path / "fresh"))

    with pytest.raises(SystemExit, match="holds states of another extraction"):
        run(llava_dir, instances, images, tmp_path / "out", "--limit", "3", "--layer", "1")
    with pytest.raises(SystemExit) as usage:
        run(llava_dir, instances, images, tmp_path / "out", "--heldout", "1.5")
    assert usage.value.code == 2 and "heldout must be in (0, 1)" in capsys.readouterr().err


def test_a_gpu_this_machine_lacks_is_refused_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:  # nothing else exists: the device comes first
        main(["patch-readout", "--model", str(tmp_path / "model"), "--boxes",
              str(tmp_path / "boxes.json"), "--images", str(tmp_path / "images"), "--space",
              str(tmp_path / "space"), "--device", "cuda"])
    assert str(exit_info.value) == "error: device cuda: this machine has no CUDA device; use cpu"
    assert not (tmp_path / "space").exists()


@pytest.mark.parametrize(("flag", "value"), [("--lr", "nan"), ("--lr", "inf"),
                                             ("--weight-decay", "nan")])
def test_a_non_finite_fit_setting_is_refused_at_parse_time(tmp_path, capsys, flag, value):
    """NaN passed every range check of the fit's settings: the model loaded and every image's
    states were extracted before torch's Adam refused it, or (inf) the fit wrote nothing after
    a NaN readout (found following the docs)."""
    with pytest.raises(SystemExit) as usage:  # nothing exists: the settings come first
        main(["patch-readout", "--model", str(tmp_path / "model"), "--boxes",
              str(tmp_path / "boxes.json"), "--images", str(tmp_path / "images"), "--space",
              str(tmp_path / "space"), flag, value])
    assert usage.value.code == 2
    assert f"PatchReadoutConfig.{flag[2:].replace('-', '_')} must be a finite number" in (
        capsys.readouterr().err)
    assert not (tmp_path / "space").exists()
