"""The plugin's methods read their ``--model_args`` options, with the documented defaults: the
peers' settings, the steering mode and space of each ``vlsae*`` method, the affirming words."""

import contextlib
import json
import shutil

import pytest

pytest.importorskip("lmms_eval")

from eval_suites.lmms.methods import (
    LMMS_METHODS,
    RECOMMENDED_OPTIONS,
    LmmsMethod,
    affirming_token_ids,
    mode_options,
)
from eval_suites.lmms.model import VLSAELlava
from eval_suites.toyworld.assets_paths import TOY_DIR, toy_paths
from vlsae_hooks.modes.registry import mode_names


def test_a_method_gets_its_options_and_the_tokenizer_and_is_entered(toy_llava_dir, monkeypatch):
    calls = []

    class Hooks(contextlib.AbstractContextManager):  # one that hooks the model on entering
        def __enter__(self):
            calls.append("entered")
            return self

        def __exit__(self, *exc_info):
            calls.append("left")

    def steer(model, options, tokenizer):
        calls.append((type(model).__name__, options, tokenizer))
        return Hooks()

    monkeypatch.setitem(LMMS_METHODS, "probe", LmmsMethod(steer, ("knob",)))
    model = VLSAELlava(pretrained=str(toy_llava_dir), method="probe", knob=3)
    assert calls == [("LlavaForConditionalGeneration", {"knob": 3}, model.processor.tokenizer),
                     "entered"]  # and kept on for the whole evaluation


def test_peer_methods_read_their_options_and_defaults(toy_llava_dir):
    def steering(method, **options):
        return VLSAELlava(pretrained=str(toy_llava_dir), method=method, **options).steering

    vcd = steering("vcd")
    assert (vcd.alpha, vcd.beta, vcd.noise_step) == (1.0, 0.1, 500)
    vcd = steering("vcd", cd_alpha=0.5, cd_beta=0.3, noise_step=200)
    assert (vcd.alpha, vcd.beta, vcd.noise_step) == (0.5, 0.3, 200)
    dola = steering("dola")  # 4 layers, the head tied to the embeddings: "high" is [2]
    assert (dola.layers, dola.relative_top) == ([2], 0.1)
    dola = steering("dola", dola_layers=1, relative_top=0.3)  # model_args parse "1" as an int
    assert (dola.layers, dola.relative_top) == ([1], 0.3)
    assert steering("dola", dola_layers="2+0").layers == [0, 2]  # '+' joins indices
    with pytest.raises(ValueError, match="no 'low' DoLa layers in a 4-layer model"):
        steering("dola", dola_layers="low")  # "low" would need layers below the tied embeddings
    assert steering("vista").lam == 0.1


def test_vlsae_methods_steer_in_their_mode_with_the_space_given(tmp_path):
    llava = str(toy_paths().llava)
    for method, mode in [("vlsae-contrast", "contrast"), ("vlsae-reference", "reference"),
                         ("vlsae-shift", "shift"), ("vlsae-evidence", "evidence"),
                         ("vlsae-grounding", "grounding"), ("vlsae-cutoff", "contrast")]:
        assert VLSAELlava(pretrained=llava, method=method).steering.mode == mode, method
    assert all(set(mode_options(mode)) <= set(RECOMMENDED_OPTIONS) for mode in mode_names())
    space = tmp_path / "space"  # the toy space, recommending another strength
    shutil.copytree(toy_paths().llava / "vlsae_space", space)
    steering = json.loads((space / "steering.json").read_text())
    (space / "steering.json").write_text(json.dumps({**steering, "strength": 7.0}))
    handle = VLSAELlava(pretrained=llava, method="vlsae", space=str(space)).steering
    assert (handle.mode, handle.options.strength) == ("grounding", 7.0)
    lexvla = VLSAELlava(pretrained=llava, method="lexvla", space=str(TOY_DIR / "lexvla"))
    assert lexvla.steering.options.strength == 4.0


class Words:
    """A tokenizer that tells "yes" from " yes" and "Yes", and splits "Yes"."""

    unk_token_id = 0
    ids = {"yes": [12], " yes": [4], "Yes": [7, 2], " Yes": [0], "oui": [], " oui": [0]}

    def __call__(self, text, add_special_tokens=True):
        assert not add_special_tokens
        return {"input_ids": self.ids[text]}


def test_affirming_words_are_the_first_token_of_each_word_alone_and_after_a_space():
    assert affirming_token_ids(Words()) == (4, 7, 12)
    assert affirming_token_ids(Words(), "oui+yes") == (4, 12)  # unknown words are left out
    with pytest.raises(ValueError, match="knows none of the affirming words 'oui'"):
        affirming_token_ids(Words(), "oui")
    model = VLSAELlava(pretrained=str(toy_paths().llava)).model
    with LMMS_METHODS["vlsae-evidence"].steer(model, {"affirm": 0.15}, Words()) as handle:
        assert handle.options.affirm_token_ids == (4, 7, 12)  # "yes" and "Yes" by default
    with LMMS_METHODS["vlsae-evidence"].steer(model, {"affirm_words": "Yes"}, Words()) as handle:
        # " Yes" is the unknown token: left out; affirm not given: the evidence mode's 0
        assert (handle.options.affirm_token_ids, handle.options.affirm) == ((7,), 0.0)
