"""LexVLA's model: lexical vectors, codebooks, losses, retrieval / PatchDis metrics, vocabulary
mapping, phrase units and byte-level tokenizers, on a tiny word-level Llama and a tiny random
DINOv2 (``helpers.lexvla``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.lexvla import SPECIAL, images, tiny_config, word_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sae_training.lexvla.evaluate import patch_labels, patchdis, retrieval_metrics
from sae_training.lexvla.losses import caption_word_loss, overuse_penalty
from sae_training.lexvla.model import LexVLA
from sae_training.lexvla.vocabulary import prune_vocabulary
from sae_training.losses import info_nce
from vlsae_hooks.spaces import load_space
from vlsae_hooks.spaces.lexvla import UNMAPPED, map_vocabulary


def test_pruning_rule_keeps_alphabetic_non_stopwords(model):
    assert model.words == ["red", "blue", "green", "star", "ring", "square", "image", "shows"]
    assert prune_vocabulary(model.tokenizer, ["star", "red"])[0] == ["star", "red"]
    with pytest.raises(ValueError, match="not in the text tokenizer"):
        prune_vocabulary(model.tokenizer, ["unicorn"])
    with pytest.raises(ValueError, match=r"repeats \['red'\]"):
        prune_vocabulary(model.tokenizer, ["red", "star", "red"])
    with pytest.raises(ValueError, match="vocabulary is empty"):
        prune_vocabulary(model.tokenizer, [])


@torch.no_grad()
def test_lexical_vectors_shapes_and_sparsity(model):
    n_words, threshold = len(model.words), model.space.threshold
    assert threshold == pytest.approx(1 / np.sqrt(n_words))
    dense = model.image_vectors(images(3))
    text = model.text_vectors(["a red star", "a blue ring", "a green square and a red ring"])
    for vectors in (dense, text):
        assert vectors.shape == (3, n_words)
        assert (vectors > 0).all()  # elu + 1 is positive before the cut
        assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    sparse = model.image_vectors(images(3), sparse=True)
    kept = sparse > 0
    assert torch.equal(kept, dense >= threshold) and torch.equal(sparse[kept], dense[kept])
    assert kept.any(1).all()  # a unit vector always has an entry >= 1/sqrt(V)
    values, indices = model.space.encode_sparse(model.space.patch_features(images(3)), "vision")
    assert values.shape == indices.shape == (3, model.space.config.k)


def test_codebooks_start_equal_and_text_codebook_is_frozen(model):
    lm_head = model.text_lm.get_base_model().get_output_embeddings().weight
    rows = lm_head[model.word_ids].detach()
    assert torch.equal(model.space.text_codebook, rows)
    assert torch.equal(model.space.vision_codebook.detach(), rows)
    assert not lm_head.requires_grad
    assert "text_codebook" not in dict(model.named_parameters())  # a buffer: no optimizer sees it
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "space.vision_codebook" in trainable and any("lora_" in n for n in trainable)


def test_overuse_penalty_punishes_an_always_on_word():
    spread = torch.zeros(8, 8)
    spread[torch.arange(8), torch.arange(8)] = 1.0  # each sample its own word
    always = torch.zeros(8, 8)
    always[torch.arange(8), torch.arange(8)] = 0.6
    always[:, 0] = 0.8  # word 0 on for every sample
    assert overuse_penalty(spread).item() == pytest.approx(1.0)
    assert overuse_penalty(always) > overuse_penalty(spread) + 1
    assert overuse_penalty(torch.eye(8)[[0] * 8]).item() == pytest.approx(8.0)


def test_caption_words_target_the_captions_own_kept_words(model):
    targets = model.caption_words(["a red star and a red ring", "there is of"])
    assert (targets[0].nonzero()[:, 0].tolist()
            == [model.words.index(w) for w in ("red", "star", "ring")])
    assert targets[1].sum() == 0
    scores = torch.zeros(2, len(model.words), requires_grad=True)
    loss = caption_word_loss(scores, targets)
    assert loss.item() == pytest.approx(np.log(len(model.words)))  # uniform guess, row 2 skipped
    loss.backward()
    assert (scores.grad[0, targets[0] > 0] < 0).all() and (scores.grad[1] == 0).all()


def test_info_nce_prefers_matched_pairs():
    x = torch.nn.functional.normalize(torch.rand(4, 6), dim=-1)
    assert info_nce(x, x, 0.05) < info_nce(x, x.roll(1, 0), 0.05)


def test_retrieval_metrics_on_known_ranks():
    # 3 images, 4 captions: captions 0,1 -> image 0, caption 2 -> image 1, caption 3 -> image 2
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.0],   # image 0: best right caption (0) ranks 1st
                        [0.8, 0.2, 0.3, 0.1],   # image 1: right caption (2) ranked after 0 -> r=1
                        [0.1, 0.7, 0.6, 0.5]])  # image 2: caption 3 after 1, 2 -> rank 2
    m = retrieval_metrics(sim, torch.tensor([0, 0, 1, 2]), ks=(1, 2, 3))
    assert m["i2t_r1"] == pytest.approx(1 / 3)
    assert m["i2t_r2"] == pytest.approx(2 / 3)
    assert m["i2t_r3"] == pytest.approx(1.0)
    # caption 0: image 0 first; caption 1: image 2 > image 1 > image 0 -> rank 2; caption 2:
    # image 2 (0.6) > image 0 (0.5) > image 1 (0.3) -> rank 2; caption 3: image 2 first
    assert m["t2i_r1"] == pytest.approx(2 / 4)
    assert m["t2i_r2"] == pytest.approx(2 / 4)
    assert m["t2i_r3"] == pytest.approx(1.0)
    tie = retrieval_metrics(torch.ones(2, 2), torch.tensor([0, 1]), ks=(1,))
    assert tie["i2t_r1"] == 0.0 and tie["t2i_r1"] == 0.0  # ties count against the model


def test_patchdis_on_a_constructed_map():
    classes = torch.eye(3)  # class c <-> word c
    weights = torch.zeros(1, 4, 3)
    weights[0, 0, 0] = weights[0, 1, 0] = 1.0  # patches 0, 1 look like class 0
    weights[0, 2, 1] = 1.0  # patch 2 looks like class 1
    weights[0, 3, 0] = 1.0  # patch 3 looks like class 0 but is class 1
    labels = torch.tensor([[0, -1, 1, 1]])  # patch 1 is background: not scored
    result = patchdis(weights, classes, labels)
    # class 0: TP 1, FP 1 (patch 3) -> 1/2; class 1: TP 1, FN 1 -> 1/2; class 2 absent
    assert result["per_class_iou"] == {0: 0.5, 1: 0.5}
    assert result["miou"] == pytest.approx(0.5)
    assert result["patch_accuracy"] == pytest.approx(2 / 3)
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, :2, :2] = True  # top-left patch fully class 0
    masks[1, 2:, 2:] = True
    masks[1, 2, 0] = True  # a quarter of the bottom-left patch: below half, background
    assert patch_labels(masks, 2).tolist() == [0, -1, -1, 1]


def test_vocabulary_maps_between_two_tokenizers_by_string():
    lexical = ["red", "star", "unicorn", "\u2581ring"]
    other = word_tokenizer(["star", "zebra", "red", "ring"])  # different ids, no "unicorn"
    ids = map_vocabulary(lexical, other)
    vocab = other.get_vocab()
    assert ids == [vocab["red"], vocab["star"], UNMAPPED, vocab["ring"]]
    assert map_vocabulary(["<pad>"], other) == [UNMAPPED]  # special tokens never match


def test_phrase_units_targets_codebooks_and_round_trip(text_model_dir, tmp_path):
    from sae_training.lexvla.losses import presence_loss

    torch.manual_seed(0)
    lex = LexVLA.build(tiny_config(text_model_dir, vocabulary=["red", "blue", "star", "ring"],
                                   phrases=["red star", "blue ring"]))
    assert lex.words == ["red", "blue", "star", "ring", "red star", "blue ring"]
    head = lex.text_lm.get_output_embeddings().weight.detach()
    ids = lex.tokenizer.convert_tokens_to_ids(["red", "star"])
    assert torch.allclose(lex.space.text_codebook[4], head[ids].mean(0))
    assert torch.allclose(lex.space.vision_codebook[4], head[ids].mean(0))
    # a phrase counts only when its words come in a row
    targets = lex.caption_words(["a red star and a blue star", "a star , red ring"])
    assert targets.tolist() == [[1, 1, 1, 0, 1, 0], [1, 0, 1, 1, 0, 0]]
    # the phrases' text rows train, the words' stay the LM head
    assert lex.phrase_text.requires_grad and not lex.space.text_codebook.requires_grad
    with torch.no_grad():
        lex.phrase_text.add_(1.0)
    scores = lex.text_scores(["a red star"])
    assert torch.allclose(scores[0, 4], lex.text_hidden(["a red star"])[0] @ lex.phrase_text[0],
                          atol=1e-5)
    lex.save_pretrained(tmp_path / "lex")
    loaded = LexVLA.from_pretrained(tmp_path / "lex")
    assert torch.equal(loaded.phrase_text, lex.phrase_text.detach())
    assert loaded.phrase_ids == lex.phrase_ids == [ids, lex.tokenizer.convert_tokens_to_ids(
        ["blue", "ring"])]
    assert torch.equal(load_space(tmp_path / "lex").text_codebook[4:], lex.phrase_text.detach())
    # presence: a confident right score costs less than a confident wrong one
    right = presence_loss(torch.tensor([[5.0, -5.0]]), torch.tensor([[1.0, 0.0]]))
    assert right < 0.01 < presence_loss(torch.tensor([[-5.0, 5.0]]), torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="at least two known tokens"):
        LexVLA.build(tiny_config(text_model_dir, phrases=["red"]))


def test_a_byte_level_tokenizer_finds_phrases_and_first_words_inside_captions(tmp_path):
    """Llama-3 / GPT-2 style BPE marks a word with "Ġ" only after a space: a caption's first word
    and a phrase are counted as they are written inside a text."""
    from tokenizers import decoders, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a red star and a blue ring", "red star", "blue ring"] * 50,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL[:3],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=4, max_position_embeddings=64,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2)
                     ).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    lex = LexVLA.build(tiny_config(tmp_path / "lm", vocabulary=["Ġred", "Ġblue", "Ġstar", "Ġring"],
                                   phrases=["red star"]))
    assert lex.tokenizer.convert_ids_to_tokens(lex.phrase_ids[0]) == ["Ġred", "Ġstar"]
    named = lex.caption_words(["red star and blue ring"])[0].tolist()
    assert named == [1.0, 1.0, 1.0, 1.0, 1.0]  # Ġred, Ġblue, Ġstar, Ġring and "red star"
