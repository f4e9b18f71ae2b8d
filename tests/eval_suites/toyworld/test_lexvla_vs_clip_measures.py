"""What lexvla_vs_clip's measures are: each model's PatchDis, retrieval and mass shares computed
again from the models' own vectors (the shipped toy models), and CLIP's retrieval ranked by cosine
each way (a tiny CLIP, whose retrieval is not perfect)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eval_suites.toyworld.assets_paths import TOY_DIR
from eval_suites.toyworld.lexvla_vs_clip import clip_image_embeddings, clip_text_embeddings
from sae_training.lexvla.evaluate import mass_share_outside, patch_classes


def _same_scores(scores, dis, bare, retrieval):
    assert (scores["patchdis_miou"], scores["patch_accuracy"], scores["patchdis_bare"]) == (
        dis["miou"], dis["patch_accuracy"], bare["miou"])
    assert {k: scores[k] for k in retrieval if k[:3] in ("i2t", "t2i")} == {
        k: v for k, v in retrieval.items() if k[:3] in ("i2t", "t2i")}


@pytest.mark.skipif(not (TOY_DIR / "lexvla" / "config.json").is_file(),
                    reason="toy models not shipped")
def test_each_models_measures_are_what_their_names_say():
    import eval_suites.toyworld.lexvla_vs_clip as vs
    from sae_training.lexvla import evaluate as ev

    lexvla, clip, processor = vs.load_models()
    scenes, captions = vs.heldout_pairs(12, 3)
    labels = vs.patch_grid_labels(scenes, 8)
    scores, classes = vs.measure_clip(clip, processor, scenes, captions)
    pixels = processor(images=[s.image for s in scenes], return_tensors="pt")["pixel_values"]
    images, patches = clip_image_embeddings(clip, pixels)
    assert patches.shape[1] == 64

    def texts(batch):
        tokens = processor.tokenizer(batch, padding=True, return_tensors="pt")
        return clip_text_embeddings(clip, tokens["input_ids"], tokens["attention_mask"])

    named, bare = texts(vs.class_texts()), texts(vs.class_texts("{}"))
    sim = F.normalize(images, dim=-1) @ F.normalize(texts(captions), dim=-1).T
    _same_scores(scores, ev.patchdis(patches, named, labels), ev.patchdis(patches, bare, labels),
                 ev.retrieval_metrics(sim, torch.arange(12)))
    assert torch.equal(classes, patch_classes(patches, named))

    train = vs.training_captions(3)  # few: mass falls on units they do not use
    scores, classes = vs.measure_lexvla(lexvla, scenes, captions, train)
    photos = [s.image for s in scenes]
    img, txt = ev.image_vectors(lexvla, photos), ev.text_vectors(lexvla, captions)
    weights = ev.patch_weights(lexvla, photos)
    named = ev.text_vectors(lexvla, vs.class_texts())
    bare = ev.text_vectors(lexvla, vs.class_texts("{}"))
    _same_scores(scores, ev.patchdis(weights, named, labels), ev.patchdis(weights, bare, labels),
                 ev.retrieval_metrics(img @ txt.T, torch.arange(12)))
    assert torch.equal(classes, patch_classes(weights, named))
    used = ev.used_units(lexvla, train)
    own = lexvla.caption_words(captions).bool()
    naming = torch.tensor([w in vs.naming_units() for w in lexvla.words])
    shares = {f"{name}_{side}": mass_share_outside(vectors, allowed)
              for name, allowed in (("overuse", used), ("non_naming", naming),
                                    ("off_caption", own))
              for side, vectors in (("image", img), ("text", txt))}
    assert {k: scores[k] for k in shares} == shares
    assert len(set(shares.values())) == 6  # each share its own
    assert scores["unused_words"] == [w for w, u in zip(lexvla.words, used) if not u]
    assert 0 < len(scores["unused_words"]) < scores["n_words"] == len(lexvla.words)


def test_clip_retrieval_ranks_by_cosine_each_way(tiny_clip_model):
    import eval_suites.toyworld.lexvla_vs_clip as vs
    from eval_suites.toyworld.world import heldout_scenes
    from sae_training.lexvla.evaluate import retrieval_metrics
    from vlsae_hooks.testing import tiny_processor

    processor = tiny_processor(tiny_clip_model)
    scenes = heldout_scenes(3, 12)
    captions = [f"w{i} w{20 + i} w{40 + 2 * i}" for i in range(12)]
    scores, _ = vs.measure_clip(tiny_clip_model, processor, scenes, captions)
    pixels = processor(images=[s.image for s in scenes], return_tensors="pt")["pixel_values"]
    ids = processor.tokenizer(captions, padding=True, return_tensors="pt")["input_ids"]
    sim = F.cosine_similarity(clip_image_embeddings(tiny_clip_model, pixels)[0][:, None],
                              clip_text_embeddings(tiny_clip_model, ids)[None], dim=-1)
    expected = retrieval_metrics(sim, torch.arange(12))
    assert {k: scores[k] for k in expected if k[:3] in ("i2t", "t2i")} == pytest.approx(
        {k: v for k, v in expected.items() if k[:3] in ("i2t", "t2i")})
    assert (scores["i2t_r1"], scores["i2t_r5"]) != (scores["t2i_r1"], scores["t2i_r5"])


def test_clip_retrieval_does_not_favour_images_whose_embeddings_are_longer(tiny_clip_model,
                                                                          monkeypatch):
    """Ranked by cosine: each image's embedding scaled by its own factor ranks as before (a dot
    product would hand every caption the longest image)."""
    import eval_suites.toyworld.lexvla_vs_clip as vs
    from eval_suites.toyworld.world import heldout_scenes
    from vlsae_hooks.testing import tiny_processor

    processor, scenes = tiny_processor(tiny_clip_model), heldout_scenes(3, 12)
    captions = [f"w{i} w{20 + i} w{40 + 2 * i}" for i in range(12)]
    plain, _ = vs.measure_clip(tiny_clip_model, processor, scenes, captions)
    scales = 10.0 ** torch.arange(12.0).remainder(4)  # 1, 10, 100, 1000, 1, ...

    def longer(model, pixels):
        images, patches = clip_image_embeddings(model, pixels)
        return images * scales[:, None], patches

    monkeypatch.setattr(vs, "clip_image_embeddings", longer)
    scaled, _ = vs.measure_clip(tiny_clip_model, processor, scenes, captions)
    retrieval = [k for k in plain if k[:3] in ("i2t", "t2i")]
    assert {k: scaled[k] for k in retrieval} == pytest.approx({k: plain[k] for k in retrieval})
