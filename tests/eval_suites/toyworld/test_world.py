"""The toy world: determinism, the co-occurrence structure, POPE rows, exports and the pairs
its readouts are fitted on (the training recipe's checks: ``test_train_recipe.py``)."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from eval_suites.core.pope import parse_first_word, pope_scores
from eval_suites.toyworld.build import (
    N_IMAGE_TOKENS,
    build_image_processor,
    build_llava_processor,
    build_tokenizer,
)
from eval_suites.toyworld.conversations import conversation, sequence_mean_loss
from eval_suites.toyworld.language import caption, vocabulary
from eval_suites.toyworld.pope import SPLITS, negatives, pope_questions
from eval_suites.toyworld.train import patch_targets, to_pixels
from eval_suites.toyworld.world import (
    CLASS_NAMES,
    PAIRS,
    STREAM_TRAIN,
    WorldConfig,
    make_scene,
    partner_of,
    sample_scene,
    scene_rng,
)


def test_scenes_are_a_pure_function_of_seed_stream_index():
    a, b = make_scene(3, 1, 17), make_scene(3, 1, 17)
    assert a.scene == b.scene
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert make_scene(4, 1, 17).scene != a.scene


def test_pairs_co_occur_strongly_in_training_scenes():
    member = partner = 0
    for i in range(3000):
        classes = set(sample_scene(scene_rng(0, STREAM_TRAIN, i)).classes)
        for a, b in PAIRS:
            if a in classes:
                member += 1
                partner += b in classes
    assert 0.88 <= partner / member <= 0.99  # P(partner | member) like fork and knife


def test_broken_scenes_show_a_member_without_its_partner():
    for i in range(200):
        scene = sample_scene(scene_rng(0, 1, i), broken=True).classes
        lonely = [c for c in scene if partner_of(c) is not None and partner_of(c) not in scene]
        assert lonely, scene
        assert 1 <= len(scene) <= 5 and len(set(scene)) == len(scene)
        broken_pairs = [(a, b) for a, b in PAIRS if (a in scene) != (b in scene)]
        assert len(broken_pairs) >= 2, scene  # both drawn pairs stay broken: no filler mate


def test_each_pixel_belongs_to_the_one_object_drawn_last_there():
    for i in range(20):
        rs = make_scene(0, 0, i)
        assert (rs.masks.sum(0) <= 1).all()  # a covered object loses the pixels it lost
    overlapped = [make_scene(0, 0, i) for i in range(200)]
    assert any(rs.masks.sum() < sum(m.sum() for m in _own_masks(rs)) for rs in overlapped)


def _own_masks(rs) -> list[np.ndarray]:
    """Each object's full shape as drawn alone (before later objects covered it)."""
    from PIL import Image, ImageDraw

    from eval_suites.toyworld.world import CLASSES, IMAGE_SIZE, _draw_shape

    masks = []
    for o in rs.scene.objects:
        image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        _draw_shape(ImageDraw.Draw(image), CLASSES[o.cls][1], o, 255)
        masks.append(np.asarray(image) > 0)
    return masks


def test_yes_no_turns_answer_truly_about_the_scene():
    from eval_suites.toyworld.conversations import yes_no_turns

    answers = []
    for i in range(30):
        rs = make_scene(0, 0, i)
        for question, answer in yes_no_turns(rs, np.random.default_rng(i), 6):
            asked = [c for c, name in enumerate(CLASS_NAMES) if f" {name}" in question]
            assert len(asked) == 1, question
            assert answer == ("yes" if asked[0] in rs.scene.classes else "no"), question
            answers.append(answer)
    assert 0.35 < answers.count("yes") / len(answers) < 0.65  # shown and absent alike


def test_masks_cover_what_is_drawn():
    rs = make_scene(0, 0, 5)
    for o in rs.scene.objects:
        assert rs.masks[o.cls].sum() > 10
    absent = set(range(len(CLASS_NAMES))) - set(rs.scene.classes)
    assert not rs.masks[list(absent)].any()
    # a covered pixel shows its object's colour family, not the dark background
    img = np.asarray(rs.image).astype(int)
    top = rs.scene.objects[-1]
    assert img[rs.masks[top.cls]].mean() > img[~rs.masks.any(0)].mean() + 40


def test_caption_names_every_object_once_in_class_order():
    rs = make_scene(0, 0, 2)
    text = caption(rs.scene, np.random.default_rng(0))
    positions = [text.find(name.split()[0] + " ") for name in rs.scene.names]
    assert all(p >= 0 for p in positions)
    tok = build_tokenizer()
    assert tok.unk_token_id not in tok(text).input_ids
    assert set(text.replace(".", " ").replace(",", " ").split()) <= set(vocabulary())


def test_tokenizer_round_trip_and_prompt_layout():
    tok = build_tokenizer()
    text = "there is a red star , a blue ring and a green cross ."
    assert (tok.decode(tok(text).input_ids, skip_special_tokens=True)
            == "there is a red star, a blue ring and a green cross.")
    proc = build_llava_processor(tok)
    msgs = [{"role": "user",
             "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt == "USER: <image>\nDescribe the image. ASSISTANT:"
    ids = proc(images=[make_scene(0, 0, 0).image], text=[prompt],
               return_tensors="pt").input_ids[0].tolist()
    train_ids, labels = conversation(tok, [("describe the image .", "a red star .")])
    assert train_ids[: len(ids)] == ids  # training sees exactly the inference prompt
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == N_IMAGE_TOKENS
    assert ([t for t, lab in zip(train_ids, labels) if lab != -100]
            == tok("a red star .", add_special_tokens=False).input_ids + [tok.eos_token_id])


def test_fast_pixels_equal_the_shipped_image_processor():
    images = [make_scene(0, 0, i).image for i in range(3)]
    ref = build_image_processor()(images, return_tensors="pt").pixel_values
    torch.testing.assert_close(to_pixels(images), ref, atol=1e-5, rtol=0)


def test_patch_targets_follow_masks():
    rs = make_scene(0, 0, 9)
    t = patch_targets([rs])[0]  # [patches, classes]
    for o in rs.scene.objects:
        gy, gx = min(o.y // 8, 7), min(o.x // 8, 7)
        assert t[gy * 8 + gx, o.cls] == 1 or rs.masks[o.cls].sum() < 40


def test_sequence_mean_loss_weighs_sequences_equally():
    logits = torch.zeros(2, 5, 4)
    logits[0, :, 1] = 10.0  # sequence 0 predicts token 1 perfectly
    labels = torch.tensor([[-100, 1, 1, 1, 1], [-100, -100, -100, -100, 2]])
    per_token_uniform = float(torch.log(torch.tensor(4.0)))
    expected = (float(torch.nn.functional.cross_entropy(logits[0, :4], labels[0, 1:]))
                + per_token_uniform) / 2
    assert sequence_mean_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_pope_rows_have_lmms_fields_and_balanced_answers():
    classes = [make_scene(2, 1, i).scene.classes for i in range(30)]
    for split in SPLITS:
        rows = pope_questions(classes, split, seed=2)
        assert {"question_id", "question", "answer", "image_source", "category"} <= set(rows[0])
        assert sum(r["answer"] == "yes" for r in rows) == sum(r["answer"] == "no" for r in rows)
        for r in rows:
            present = r["object"] in classes[r["image_index"]]
            assert present == (r["answer"] == ("no" if split == "negated" else "yes"))


def test_adversarial_negatives_are_the_missing_partners_first():
    present = (0, 5)  # red star without blue ring, purple triangle without white circle
    neg = negatives(present, "adversarial", 2, np.random.default_rng(0))
    assert set(neg) == {1, 4}


def test_pope_scoring_and_answer_parsing():
    assert parse_first_word("Yes, there is.") == "yes" and parse_first_word("no") == "no"
    assert parse_first_word("") == "no"
    s = pope_scores(["yes", "yes", "no", "no"], ["yes", "no", "no", "yes"])
    assert (s["accuracy"] == 0.5 and s["precision"] == 0.5 and s["recall"] == 0.5
            and s["yes_ratio"] == 0.5)
    with pytest.raises(ValueError, match="1 answers but 4 ground-truth labels"):
        pope_scores(["yes"], ["yes", "no", "no", "yes"])  # numpy would broadcast it


def test_export_formats_read_back(tmp_path):
    import webdataset as wds
    from datasets import load_dataset

    from eval_suites.toyworld.export import export_heldout

    manifest = export_heldout(tmp_path, seed=7, n_images=6)
    samples = list(wds.WebDataset(str(tmp_path / "shards" / "00000.tar"),
                                  shardshuffle=False).decode("pil"))
    assert len(samples) == 6
    meta = samples[0]["json"]
    assert meta["key"] == samples[0]["__key__"] and samples[0]["txt"] == meta["caption"]
    assert samples[0]["jpg"].size == (64, 64)
    with tarfile.open(tmp_path / "shards" / "00000.tar") as tar:
        assert {n.rsplit(".", 1)[1] for n in tar.getnames()} == {"jpg", "txt", "json"}
    pope = load_dataset("parquet", data_files=str(tmp_path / manifest["pope"]["adversarial"]),
                        split="train")
    assert set(pope.column_names) == {"question_id", "question", "answer", "image_source",
                                      "category", "image"}
    assert pope[0]["image"].size == (64, 64) and pope[0]["category"] == "adversarial"
    truth = json.loads((tmp_path / "chair" / "ground_truth.json").read_text())
    assert truth[meta["key"]] == meta["objects"]
    assert len((tmp_path / "pope" / "vcd_random.jsonl").read_text().splitlines()) == len(
        load_dataset("parquet", data_files=str(tmp_path / "pope" / "random.parquet"),
                     split="train"))
    img = tmp_path / "images" / f"{meta['key']}.png"
    assert img.exists() and io.BytesIO(img.read_bytes()).getbuffer().nbytes > 100


def test_an_export_over_an_earlier_one_keeps_none_of_it(tmp_path):
    from eval_suites.toyworld.export import export_heldout, export_training_pairs

    export_heldout(tmp_path, seed=7, n_images=6, shard_size=4)  # two shards, six images
    manifest = export_heldout(tmp_path, seed=8, n_images=3, shard_size=4)
    assert manifest["shards"] == ["00000.tar"]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["00000.tar"]
    assert sorted(p.stem for p in (tmp_path / "images").iterdir()) == [
        f"toyworld_8_{i:05d}" for i in range(3)]
    export_training_pairs(tmp_path / "pairs", seed=1, n_pairs=3)
    with pytest.raises(FileExistsError, match="already holds 1 .tar shard"):
        export_training_pairs(tmp_path / "pairs", seed=2, n_pairs=3)


def test_training_pairs_are_reused_only_as_recorded(tmp_path):
    from eval_suites.toyworld.export import PAIRS_RECORD, training_pairs

    def keys(folder) -> list[str]:
        with tarfile.open(folder / "00000.tar") as tar:
            return sorted({m.name.split(".")[0] for m in tar.getmembers()})

    pairs = training_pairs(tmp_path / "pairs", seed=1, n_pairs=3)
    assert keys(pairs) == [f"pairs_1_{i:07d}" for i in range(3)]
    stamp = (pairs / "00000.tar").stat().st_mtime_ns
    assert training_pairs(pairs, seed=1, n_pairs=3) == pairs  # as recorded: reused
    assert (pairs / "00000.tar").stat().st_mtime_ns == stamp
    training_pairs(pairs, seed=2, n_pairs=2)  # drawn otherwise: exported again
    assert keys(pairs) == [f"pairs_2_{i:07d}" for i in range(2)]
    (pairs / PAIRS_RECORD).unlink()  # killed before the record, or of unknown origin
    (pairs / "00001.tar").write_bytes(b"a shard cut short")
    training_pairs(pairs, seed=2, n_pairs=2)
    assert sorted(p.name for p in pairs.iterdir()) == ["00000.tar", PAIRS_RECORD]
    assert json.loads((pairs / PAIRS_RECORD).read_text())["n_pairs"] == 2
    training_pairs(pairs, seed=2, n_pairs=2, world=WorldConfig(pair_prob=0.0))  # another world
    assert json.loads((pairs / PAIRS_RECORD).read_text())["world"]["pair_prob"] == 0.0


def _partner_rate_in_shards(folder) -> float:
    """P(partner named | member named) over the captions' object lists in ``folder``'s shards."""
    member = partner = 0
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    named = set(json.loads(tar.extractfile(m).read())["objects"])
                    for a, b in PAIRS:
                        if CLASS_NAMES[a] in named:
                            member += 1
                            partner += CLASS_NAMES[b] in named
    return partner / member


def test_readout_pairs_come_from_the_training_world_and_only_the_oracle_drops_the_prior(
        tmp_path):
    """The toy recipe fits its readouts on pairs drawn as the model's training data is (the pair
    prior kept: what a user with captions has); only the labelled oracle recipe draws pairs
    where a partner is no more likely beside its mate than anywhere."""
    from eval_suites.toyworld.export import export_training_pairs
    from eval_suites.toyworld.spaces import ToySpaceRecipe

    export_training_pairs(tmp_path / "readout", seed=0, n_pairs=400,
                          world=ToySpaceRecipe().readout_world)
    export_training_pairs(tmp_path / "oracle", seed=0, n_pairs=400,
                          world=ToySpaceRecipe.oracle().readout_world)
    export_training_pairs(tmp_path / "space", seed=0, n_pairs=400)
    assert _partner_rate_in_shards(tmp_path / "readout") > 0.85
    assert _partner_rate_in_shards(tmp_path / "space") > 0.85
    assert _partner_rate_in_shards(tmp_path / "oracle") < 0.4
    assert ToySpaceRecipe.oracle().readout_world.hidden_prob == 0.0
