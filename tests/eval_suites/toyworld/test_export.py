"""The held-out export holds each POPE row with its own image in both question formats, CHAIR's
truth, synonyms and broken-pair list, and a manifest written last; it refuses a folder that is
another artifact's; training pairs are reused only as recorded and a killed export leaves no
record."""

import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from eval_suites.toyworld import export as export_module
from eval_suites.toyworld.export import (
    EXPORT_MARK,
    PAIRS_RECORD,
    export_heldout,
    export_training_pairs,
    image_id,
    training_pairs,
)
from eval_suites.toyworld.language import caption
from eval_suites.toyworld.pope import SPLITS, pope_questions
from eval_suites.toyworld.world import CLASS_NAMES, class_synonyms, heldout_scenes


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    return out, export_heldout(out, seed=5, n_images=4, shard_size=3)


def _shard_samples(path) -> list[dict]:
    with tarfile.open(path) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({name.split(".")[0] for name in files})
    return [{"key": k, "txt": files[f"{k}.txt"].decode(), "json": json.loads(files[f"{k}.json"]),
             "jpg": files[f"{k}.jpg"]} for k in keys]


def test_the_manifest_names_every_file_and_the_shards_hold_every_scene_once(exported):
    out, manifest = exported
    assert manifest == {
        "seed": 5, "n_images": 4, "shards": ["00000.tar", "00001.tar"],
        "pope": {split: f"pope/{split}.parquet" for split in SPLITS},
        "chair": {"ground_truth": "chair/ground_truth.json", "synonyms": "chair/synonyms.json",
                  "broken_pair": "chair/broken_pair.json"}}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    samples = [_shard_samples(out / "shards" / name) for name in manifest["shards"]]
    assert [len(s) for s in samples] == [3, 1]  # shard_size scenes a shard
    scenes = heldout_scenes(5, 4)
    rng = np.random.default_rng([5, 99])
    for i, (sample, scene) in enumerate(zip(samples[0] + samples[1], scenes)):
        assert sample["key"] == image_id(5, i) == f"toyworld_5_{i:05d}"
        assert sample["txt"] == caption(scene.scene, rng) == sample["json"]["caption"]
        assert sample["json"] == {"key": sample["key"], "caption": sample["txt"],
                                  "objects": list(scene.scene.names),
                                  "broken_pair": scene.scene.broken_pair}
        assert Image.open(io.BytesIO(sample["jpg"])).format == "JPEG"
        png = np.asarray(Image.open(out / "images" / f"{sample['key']}.png"))
        assert np.array_equal(png, np.asarray(scene.image))


@pytest.mark.parametrize("split", SPLITS)
def test_each_pope_row_holds_its_own_image_in_both_formats(exported, split):
    out, manifest = exported
    scenes = heldout_scenes(5, 4)
    rows = pope_questions([s.scene.classes for s in scenes], split, 5)
    table = pd.read_parquet(out / manifest["pope"][split])
    vcd = [json.loads(line) for line in
           (out / "pope" / f"vcd_{split}.jsonl").read_text().splitlines()]
    assert len(table) == len(vcd) == len(rows) > 0
    for row, saved, line in zip(rows, table.to_dict("records"), vcd):
        key = image_id(5, row["image_index"])
        assert {k: saved[k] for k in ("question_id", "question", "answer", "image_source",
                                      "category")} == {
            "question_id": row["question_id"], "question": row["question"],
            "answer": row["answer"], "image_source": key, "category": split}
        pixels = np.asarray(Image.open(io.BytesIO(saved["image"]["bytes"])))
        assert np.array_equal(pixels, np.asarray(scenes[row["image_index"]].image))
        assert line == {"question_id": row["question_id"], "image": f"{key}.png",
                        "text": row["question"], "label": row["answer"]}
        assert (out / "images" / line["image"]).is_file()


def test_chair_files_hold_each_images_objects_every_synonym_and_the_broken_scenes(exported):
    out, _ = exported
    scenes = heldout_scenes(5, 4)
    truth = json.loads((out / "chair" / "ground_truth.json").read_text())
    assert truth == {image_id(5, i): list(s.scene.names) for i, s in enumerate(scenes)}
    synonyms = json.loads((out / "chair" / "synonyms.json").read_text())
    assert synonyms == {name: list(class_synonyms(c)) for c, name in enumerate(CLASS_NAMES)}
    broken = json.loads((out / "chair" / "broken_pair.json").read_text())
    assert broken == [image_id(5, i) for i, s in enumerate(scenes) if s.scene.broken_pair]
    assert 0 < len(broken) < 4


@pytest.mark.parametrize("text", ['{"run": "abc", "seed": 1}', "not json", "5"])
def test_a_folder_with_another_artifacts_manifest_is_refused_and_kept(tmp_path, text):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match="not a toy-world export's .*export into another folder"):
        export_heldout(tmp_path, seed=1, n_images=2)
    assert (tmp_path / "manifest.json").read_text() == text
    assert not (tmp_path / "shards").exists()


def test_an_export_killed_midway_leaves_no_manifest(tmp_path, monkeypatch):
    export_heldout(tmp_path, seed=1, n_images=2)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "pope_questions", killed)
    with pytest.raises(KeyboardInterrupt):
        export_heldout(tmp_path, seed=2, n_images=2)
    assert not (tmp_path / "manifest.json").exists()  # the shards are seed 2's, the POPE seed 1's
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        f"toyworld_2_{i:05d}.png" for i in range(2)]
    (tmp_path / "images" / "holiday.png").write_bytes(b"put into an export's folder")
    monkeypatch.undo()
    manifest = export_heldout(tmp_path, seed=3, n_images=1)  # the killed export's mark: replaced
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == manifest["shards"]
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["toyworld_3_00000.png"]


def test_pairs_of_another_record_are_exported_again_and_a_killed_export_keeps_no_record(
        tmp_path, monkeypatch):
    pairs = training_pairs(tmp_path / "pairs", seed=1, n_pairs=2, record={"captions": "v1"})
    assert json.loads((pairs / PAIRS_RECORD).read_text())["captions"] == "v1"
    (pairs / "marker").write_text("")
    training_pairs(pairs, seed=1, n_pairs=2, record={"captions": "v1"})
    assert (pairs / "marker").exists()  # as recorded: reused
    training_pairs(pairs, seed=1, n_pairs=2, record={"captions": "v2"})
    assert not (pairs / "marker").exists()  # drawn under another record: exported again

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "export_training_pairs", killed)
    with pytest.raises(KeyboardInterrupt):
        training_pairs(pairs, seed=3, n_pairs=2)
    assert not (pairs / PAIRS_RECORD).exists()  # the next call exports again
    pairs.mkdir(exist_ok=True)
    (pairs / "00000.tar").write_bytes(b"cut short")  # a killed draw's shard: redrawn
    (pairs / "notes.txt").write_text("mine")  # beside no record: not what pairs are drawn into
    with pytest.raises(FileExistsError) as error:
        training_pairs(pairs, seed=3, n_pairs=2)
    assert str(error.value) == (f"{pairs} holds 1 file(s) that drawing pairs did not write "
                                "(notes.txt) and that drawing them again would delete: move "
                                "them or use another --work folder")
    assert (pairs / "notes.txt").read_text() == "mine"
    (pairs / "notes.txt").unlink()
    monkeypatch.undo()
    assert training_pairs(pairs, seed=3, n_pairs=2) == pairs  # a killed draw's shards: redone
    assert sorted(p.name for p in pairs.iterdir()) == ["00000.tar", PAIRS_RECORD]


def test_training_pairs_are_their_seeds_stream_with_its_captions(tmp_path):
    from eval_suites.toyworld.world import STREAM_PAIRS, make_scene

    assert export_training_pairs(tmp_path, seed=4, n_pairs=3, shard_size=2) == [
        "00000.tar", "00001.tar"]
    samples = _shard_samples(tmp_path / "00000.tar") + _shard_samples(tmp_path / "00001.tar")
    rng = np.random.default_rng([4, 98])
    for i, sample in enumerate(samples):
        scene = make_scene(4, STREAM_PAIRS, i).scene
        assert sample["key"] == f"pairs_4_{i:07d}"
        assert sample["txt"] == caption(scene, rng)
        assert sample["json"]["objects"] == list(scene.names)


def test_files_no_export_wrote_are_refused_not_replaced(tmp_path):
    """A user's own files where an export writes its own, even under the names it gives them,
    in a folder that no export has marked."""
    mine = {"images/holiday.png": b"a picture", "shards/00000.tar": b"my shard",
            "chair/synonyms.json": b"{}", "pope/random.parquet": b"my questions"}
    for name, data in mine.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    with pytest.raises(FileExistsError) as error:
        export_heldout(tmp_path, seed=1, n_images=2)
    assert str(error.value) == (
        f"{tmp_path} holds 4 file(s) an export would replace (shards/00000.tar, "
        "images/holiday.png, pope/random.parquet, ...) but no export's .toyworld-export or "
        "manifest.json: move them or export into another folder")
    assert {name: (tmp_path / name).read_bytes() for name in mine} == mine
    assert not (tmp_path / EXPORT_MARK).exists()
    (tmp_path / "notes.txt").write_text("mine")  # nothing an export writes: kept beside it
    for name in mine:
        (tmp_path / name).unlink()
    export_heldout(tmp_path, seed=1, n_images=2)
    assert (tmp_path / "notes.txt").read_text() == "mine"
