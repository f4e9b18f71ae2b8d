"""The shipped toy LexVLA: loads as a concept space, maps onto the toy LLaVA's words, carries
its metrics, and steers the toy LLaVA through the registered ``lexvla`` methods."""

from __future__ import annotations

import json

import pytest
import torch

from eval_suites.toyworld.assets_paths import TOY_DIR

LEXVLA = TOY_DIR / "lexvla"
pytestmark = pytest.mark.skipif(not (LEXVLA / "config.json").is_file(),
                                reason="toy LexVLA not trained")


def test_shipped_space_maps_onto_the_toy_llava():
    from eval_suites.toyworld.lexvla_toy import lm_words, naming_units, toy_phrases
    from vlsae_hooks.spaces import load_space

    space = load_space(LEXVLA)
    words = lm_words(TOY_DIR / "llava")
    assert space.words == words + toy_phrases()
    assert "yes" in words and "user" in words and "red star" in naming_units()
    tokenizer = json.loads((TOY_DIR / "llava" / "tokenizer.json").read_text())
    tokenizer_vocab = tokenizer["model"]["vocab"]
    assert space.vlm_token_ids.tolist() == [tokenizer_vocab[w] for w in words] + \
        [-1] * len(toy_phrases())  # a phrase is no single token: the mode binds it
    metrics = json.loads((LEXVLA / "metrics.json").read_text())
    assert {"i2t_r1", "t2i_r1"} <= set(metrics["retrieval"])
    assert 0 <= metrics["patchdis"] <= 1 and "image" in metrics["sparsity"]
    assert metrics["overuse"]["n_unused_units"] > 0  # words no caption uses are in the vocabulary


def test_registered_methods_steer_the_toy_llava(shipped_toy_llava):
    from eval_suites.core.methods import METHODS
    from eval_suites.toyworld.lexvla_method import VARIANTS
    from eval_suites.toyworld.world import heldout_scenes

    model, processor = shipped_toy_llava
    images = [s.image for s in heldout_scenes(3, 2)]
    prompts = ["Describe the image."] * 2
    with METHODS["greedy"](model, processor) as decoder:
        greedy = decoder.generate(images, prompts, 8)
    for name in VARIANTS:
        with METHODS[name](model, processor) as decoder:
            out = decoder.generate(images, prompts, 8)
        assert len(out) == 2
        if name == "lexvla-novision":
            assert out == greedy  # uniform evidence moves no logit
    from eval_suites.toyworld.lexvla_method import toy_lexvla_space
    from vlsae_hooks.spaces.lexvla import UNMAPPED

    steering = {w for w, t in zip(toy_lexvla_space().words, toy_lexvla_space().vlm_token_ids)
                if t != UNMAPPED}
    assert "red" in steering and "star" in steering and not {"yes", "no", "."} & steering
    assert not hasattr(model, "_vlsae_steering_handle")
    torch.testing.assert_close(model.lm_head.weight, model.get_input_embeddings().weight)


def test_tuning_registers_one_method_per_strength():
    from eval_suites.core.methods import METHODS
    from eval_suites.toyworld.lexvla_tune import DEV_SEED, register_strengths

    assert register_strengths([3, 0.5]) == ["lexvla-s3", "lexvla-s0.5"]
    assert "lexvla-s3" in METHODS and "lexvla-s0.5" in METHODS and DEV_SEED == 1


@pytest.mark.parametrize(("module", "argv", "message"), [
    ("lexvla_toy", ["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    ("lexvla_toy", ["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    ("lexvla_toy", ["--evaluate-only", "--out", "{tmp}"], "holds none (no metrics.json): train"),
    ("lexvla_toy", ["--evaluate-only", "--steps", "5", "--llava", "{tmp}"], "--llava, --steps "
     "set how a model is trained; --evaluate-only re-scores the model in --out as it was "
     "trained: drop them"),
    ("lexvla_toy", ["--overuse-weight", "-1", "--out", "{tmp}"], "overuse_weight, caption_word"),
    ("lexvla_tune", ["--strengths", "1,x"], "expected numbers separated by commas such as 1,2"),
    ("lexvla_tune", ["--strengths", "1,-2"], "strengths are finite numbers >= 0"),
])
def test_bad_input_ends_in_a_message_and_status_2(tmp_path, capsys, module, argv, message):
    import importlib

    main = importlib.import_module(f"eval_suites.toyworld.{module}").main
    work = ["--work", str(tmp_path / "work")] if module == "lexvla_toy" else ["--out", "x"]
    with pytest.raises(SystemExit) as exit_info:
        main([*work, *(a.format(tmp=tmp_path) for a in argv)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "work" / "pairs").exists()  # refused before any export
