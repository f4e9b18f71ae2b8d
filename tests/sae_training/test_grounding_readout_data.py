"""What the ``patch-readout`` command reads: the fit sees the fitted images' states and boxes
only (a unit boxed in held-out images alone is left out), the held-out AUCs are of the held-out
images (their share rounded to the nearest image), Visual Genome limits which COCO images count,
the cache is of one extraction, the fit goes to the GPU only when it fits there; a model other
than LLaVA, boxes that cannot be placed on the patches, and boxes that show nothing refused."""

import dataclasses
import json

import pytest
import torch
from helpers.coco import run, write_coco
from helpers.spaces import lexvla_space
from helpers.spies import record_results

from sae_training import grounding_readout
from sae_training.grounding_config import PatchReadoutRunConfig
from sae_training.patch_readout import auc_list, mean_auc
from sae_training.readout import token_aucs
from sae_training.samples import DataError
from vlsae_hooks import PatchReadout

torch.set_num_threads(1)


def test_the_fit_reads_the_fitted_images_and_the_aucs_the_held_out_ones(llava_dir, tmp_path,
                                                                        monkeypatch):
    instances, images = write_coco(tmp_path)
    data = json.loads(instances.read_text())  # w14 boxed in the last (a held-out) image only
    data["annotations"].append({"id": 998, "image_id": 109, "category_id": 7,
                                "bbox": [0, 0, 30, 30], "iscrowd": 0})
    instances.write_text(json.dumps(data))
    calls = record_results(monkeypatch, grounding_readout, "patch_targets", "extract_states",
                           "fit_patch_readout")
    held = []

    def heldout_probs(readout, states):  # image 108 (no w11) has one patch sure it shows w11
        targets = calls[0][2][8:, :, :2]
        held.append(states)
        probs = 0.3 + 0.4 * targets + 0.01 * torch.rand(targets.shape,
                                                         generator=torch.Generator().manual_seed(0))
        probs[0, 0, 1] = 0.95
        return probs

    monkeypatch.setattr(grounding_readout, "_heldout_probs", heldout_probs)
    report = run(llava_dir, instances, images, tmp_path / "out")
    (_, _, targets), (_, _, states), (_, (fit_states, fit_targets, *_), _) = calls
    assert targets.shape[-1] == 3 and targets[8:, :, 2].any()  # w10, w11, w14
    assert torch.equal(fit_states, states[:8]) and torch.equal(held[0], states[8:])
    assert torch.equal(fit_targets, targets[:8, :, :2])
    assert report["left_out"][-1] == {"name": "w14", "kind": "object",
                                      "reason": "no fitted image shows it"}
    assert [u["fitted_patches"] for u in report["units"]] == [
        int(targets[:8, :, i].sum()) for i in range(2)]
    probs = heldout_probs(None, states[8:])
    patch_aucs = token_aucs(probs.flatten(0, 1), targets[8:, :, :2].flatten(0, 1))
    assert [u["heldout_patch_auc"] for u in report["units"]] == auc_list(patch_aucs)
    assert [u["heldout_image_auc"] for u in report["units"]] == [None, 0.0]  # by the best patch
    assert report["heldout"] == {"images": "the last of the images, by image id",
                                 "patch_auc": mean_auc(patch_aucs), "image_auc": 0.0}


def test_the_run_passes_min_cover_and_refuses_another_extractions_cache(llava_dir, tmp_path,
                                                                       monkeypatch):
    instances, images = write_coco(tmp_path, n_images=4)
    calls = record_results(monkeypatch, grounding_readout, "patch_targets")
    run(llava_dir, instances, images, tmp_path / "out", "--heldout", "0.5", "--min-cover", "0.9")
    assert calls[0][1][4] == 0.9  # the run's min_cover
    for flag, value in (("--prompt", "USER: <image> w5 ASSISTANT:"), ("--dtype", "float16")):
        with pytest.raises(SystemExit, match=rf"another extraction \(its {flag[2:]} differ\)"):
            run(llava_dir, instances, images, tmp_path / "out", "--heldout", "0.5", flag, value)
    with pytest.raises(SystemExit, match="--layer 4 is out of range: .* has 4 decoder layers"):
        run(llava_dir, instances, images, tmp_path / "out", "--layer", "4")
    lexvla_space([5, 6, 7]).save_pretrained(tmp_path / "lexical")
    with pytest.raises(SystemExit, match="holds a 'lexvla' space, which loads no patch readout"):
        run(llava_dir, instances, images, tmp_path / "lexical")


def config(tmp_path, **changes) -> PatchReadoutRunConfig:
    return PatchReadoutRunConfig(**{"model": "m", "boxes": str(tmp_path / "instances.json"),
                                    "images": str(tmp_path / "images"), "space": "s",
                                    **changes})


def test_visual_genome_limits_which_images_count_and_two_are_needed(tmp_path):
    write_coco(tmp_path)
    vg_images = [{"image_id": 7000 + n, "coco_id": 100 + n, "width": 48, "height": 40}
                 for n in range(4, 10)]
    attributes = [{"image_id": 7000 + n, "attributes": [
        {"x": 0, "y": 0, "w": 16, "h": 16, "attributes": ["w20"]}]} for n in range(4, 10)]
    (tmp_path / "image_data.json").write_text(json.dumps(vg_images))
    (tmp_path / "attributes.json").write_text(json.dumps(attributes))
    vg = {"attributes": str(tmp_path / "attributes.json"),
          "vg_images": str(tmp_path / "image_data.json"), "attribute_words": "w20"}
    units, images = grounding_readout._read_images(config(tmp_path, limit=3, **vg))
    assert [i.key for i in images] == ["104", "105", "106"]  # the first 3 Visual Genome has
    assert [(u.name, u.is_attribute) for u in units][:2] == [("w20", True), ("w10", False)]
    with pytest.raises(DataError, match="gives 1 image"):
        grounding_readout._read_images(config(tmp_path, limit=1))


def test_each_box_labels_every_unit_it_names():
    regions = [[((0, 0, 4, 4), [0, 2])], [], [((0, 0, 4, 4), [1]), ((4, 4, 8, 8), [2])]]
    assert grounding_readout._image_labels(regions, 3).tolist() == [[1, 0, 1], [0, 0, 0],
                                                                    [0, 1, 1]]


def test_the_fit_goes_to_the_gpu_only_when_its_states_fit(monkeypatch):
    states = torch.zeros(10, 4, 8)  # 1280 bytes; a step of 4 images: 4 * 4 * 32 * 4 = 2048
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free[0], 10 ** 9))
    free = [3700]  # 0.9 of it: 3330 >= 3328
    cuda = torch.device("cuda", 0)
    assert grounding_readout._fit_device(cuda, states, batch_size=4) == cuda
    free[0] = 3690
    assert grounding_readout._fit_device(cuda, states, batch_size=4) == torch.device("cpu")
    assert grounding_readout._fit_device(torch.device("cpu"), states, 4) == torch.device("cpu")


def test_held_out_probabilities_are_of_every_image_chunk_by_chunk():
    g = torch.Generator().manual_seed(0)
    readout = PatchReadout(torch.randn(6, 2, generator=g), torch.zeros(2), torch.zeros(6),
                           torch.ones(6), torch.tensor([[5], [6]]), torch.tensor([True, False]))
    states = torch.randn(5, 3, 6, generator=g)
    torch.testing.assert_close(grounding_readout._heldout_probs(readout, states, chunk=2),
                               readout.probs(states))


def test_the_summary_names_the_units_left_out_without_their_rows():
    report = {"n_images": 3, "units": [{"name": "a"}], "config": {},
              "left_out": [{"name": "b", "kind": "object", "reason": "r"}]}
    assert grounding_readout.summary(report) == {"n_images": 3, "n_units": 1,
                                                 "left_out": ["b"]}


def test_the_held_out_share_rounds_to_the_nearest_image(llava_dir, tmp_path):
    instances, images = write_coco(tmp_path)
    report = run(llava_dir, instances, images, tmp_path / "out", "--heldout", "0.37")
    assert (report["n_fitted"], report["n_heldout"]) == (6, 4)  # 3.7 images: 4, not 3


def test_a_model_other_than_llava_is_refused_before_it_loads(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=128).save_pretrained(tmp_path / "llama")
    with pytest.raises(DataError, match=r"is a 'llama' model; the patch readout reads LLaVA-1\.5"):
        grounding_readout._model_width(config(tmp_path, model=str(tmp_path / "llama")))


@pytest.mark.parametrize("broken, message", [
    ("frame", r"the processor hands the vision tower images of \[\(24, 24\)\] pixels, the tower "
              r"reads 32 x 32"),
    ("cls", r"each image takes 17 positions, not the 4 x 4 patches .* keeps the CLS position"),
    ("targets", r"no unit has a positive target in the fitted images: more images \(--limit\) "
                r"or a lower --min-cover")])
def test_boxes_that_cannot_be_placed_or_fitted_are_refused(llava_dir, tmp_path, monkeypatch,
                                                          broken, message):
    instances, images = write_coco(tmp_path)
    if broken == "frame":  # a processor that crops to another size than the tower reads
        frame = grounding_readout.processed_frame
        monkeypatch.setattr(grounding_readout, "processed_frame", lambda processor, w, h: (
            dataclasses.replace(frame(processor, w, h), width=24, height=24)))
    elif broken == "cls":  # one position more per image than the patch grid
        extract = grounding_readout.extract_states

        def with_cls(*args):
            states = extract(*args)
            return torch.cat([states[:, :1], states], 1)

        monkeypatch.setattr(grounding_readout, "extract_states", with_cls)
    else:  # no patch of a fitted image shows any unit
        monkeypatch.setattr(grounding_readout, "patch_targets", lambda regions, grid, *rest:
                            torch.zeros(len(regions), grid * grid, 2))
    with pytest.raises(SystemExit, match=message):
        run(llava_dir, instances, images, tmp_path / "out")
