"""The toy world's texts and the toy LLaVA's training sequences: object lists, caption synonyms,
multi-turn conversations in the chat template's exact tokens, padding and the loss."""

import numpy as np
import pytest
import torch

from eval_suites.toyworld.build import build_llava_processor, build_tokenizer
from eval_suites.toyworld.conversations import (
    conversation,
    padded_batch,
    sequence_mean_loss,
    yes_no_turns,
)
from eval_suites.toyworld.language import QUESTION_TEMPLATES, caption, join_objects
from eval_suites.toyworld.world import CLASS_NAMES, CLASSES, Obj, Scene, make_scene


def test_objects_join_with_commas_and_a_last_and():
    assert join_objects(["red star"]) == "a red star"
    assert join_objects(["red star", "blue ring"]) == "a red star and a blue ring"
    assert (join_objects(["red star", "blue ring", "green cross"])
            == "a red star , a blue ring and a green cross")


def test_captions_name_a_shape_by_a_synonym_now_and_then_and_only_where_it_has_one():
    scene = Scene(objects=(Obj(cls=4, x=10, y=10, size=8, angle=0.0),    # white circle / disc
                           Obj(cls=5, x=40, y=40, size=8, angle=0.0)))   # purple triangle
    assert CLASSES[4] == ("white", "circle") and CLASSES[5] == ("purple", "triangle")
    rng = np.random.default_rng(0)
    texts = [caption(scene, rng) for _ in range(2000)]
    discs = sum("white disc" in t for t in texts) / len(texts)
    assert 0.12 < discs < 0.18  # SYNONYM_PROB
    assert all(("white disc" in t) != ("white circle" in t) for t in texts)
    assert all("a purple triangle" in t for t in texts)


def test_a_multi_turn_conversation_is_the_chat_templates_tokens_with_only_answers_labelled():
    processor = build_llava_processor()
    tok = processor.tokenizer
    turns = [("describe the image .", "a red star ."), ("is there a blue ring ?", "no")]
    ids, labels = conversation(tok, turns)
    messages = []
    for question, answer in turns:
        content = ([{"type": "image"}] if not messages else []) + [{"type": "text",
                                                                     "text": question}]
        messages += [{"role": "user", "content": content},
                     {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    text = processor.apply_chat_template(messages)
    assert text == ("USER: <image>\ndescribe the image . ASSISTANT: a red star .</s>"
                    "USER: is there a blue ring ? ASSISTANT: no</s>")
    expected = processor(images=[make_scene(0, 0, 0).image], text=[text],
                         return_tensors="pt").input_ids[0].tolist()
    assert ids == expected and len(labels) == len(ids)
    answers = [t for t, lab in zip(ids, labels) if lab != -100]
    assert answers == [*tok("a red star .", add_special_tokens=False).input_ids,
                       tok.eos_token_id, tok.convert_tokens_to_ids("no"), tok.eos_token_id]
    assert [lab for lab in labels if lab != -100] == answers


def test_yes_no_turns_ask_n_questions_in_every_form_about_every_absent_class():
    rs = make_scene(0, 0, 3)
    rng = np.random.default_rng(0)
    turns = [t for _ in range(100) for t in yes_no_turns(rs, rng, 5)]
    assert len(yes_no_turns(rs, rng, 5)) == 5 and len(turns) == 500
    asked_absent = {q for q, a in turns if a == "no"}
    absent = set(range(len(CLASSES))) - set(rs.scene.classes)
    for c in absent:
        assert any(f"a {CLASS_NAMES[c]} " in q for q in asked_absent), CLASS_NAMES[c]
    for template in QUESTION_TEMPLATES:
        head = template.split("{obj}")[0]
        assert any(q.startswith(head) for q, _ in turns), template


def test_a_batch_pads_right_with_pad_ids_ignored_labels_and_a_zero_mask():
    tok = build_tokenizer()
    batch = padded_batch(tok, [([5, 6, 7], [-100, 6, 7]), ([8], [8])])
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_a_sequence_with_no_labelled_token_adds_nothing_to_the_loss():
    logits = torch.zeros(2, 4, 3)
    labels = torch.tensor([[-100, 0, 1, 2], [-100, -100, -100, -100]])
    loss = sequence_mean_loss(logits, labels)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(float(np.log(3)) / 2, rel=1e-6)


def test_the_loss_scores_each_position_on_the_next_token():
    logits = torch.zeros(1, 3, 3)
    logits[0, 0, 2] = logits[0, 1, 1] = 20.0  # position t predicts the token at t + 1
    labels = torch.tensor([[-100, 2, 1]])
    assert sequence_mean_loss(logits, labels).item() < 1e-6
    assert sequence_mean_loss(logits, torch.tensor([[-100, 1, 2]])).item() > 10
