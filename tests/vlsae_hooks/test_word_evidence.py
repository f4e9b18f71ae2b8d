"""Evidence mode: the word readout's formula, its file, and its exact effect on the logits."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.spaces import WORD_TOKENS, word_readout
from safetensors.torch import save_file

from vlsae_hooks import ContrastOptions, NoOpSteering, ShiftOptions, attach
from vlsae_hooks.pooling import prefill_masks
from vlsae_hooks.spaces import load_space
from vlsae_hooks.testing import IMAGE_TOKEN, left_pad, llava_prompt, random_space
from vlsae_hooks.word_evidence import READOUT_NAME, WordReadout, add_token_moves, check_token_ids

torch.set_num_threads(1)
SITE = 2


@pytest.fixture(scope="module")
def space(model):
    space = random_space(model, layer=SITE, n_concepts=64, k=4)
    space.word_readout = word_readout(64)
    return space


def test_evidence_is_the_clamped_log_ratio_to_the_prior():
    readout = WordReadout(torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.tensor([0.0, 1.0]),
                          torch.tensor([7, 3]), torch.log(torch.tensor([0.5, 0.5])))
    values, indices = torch.tensor([[2.0, 1.0]]), torch.tensor([[0, 1]])
    # logits: word 7: 2*1 + 1*0.5 + 0 = 2.5; word 3: 2*(-2) + 0 + 1 = -3
    expected = torch.tensor([[0.0, F.logsigmoid(torch.tensor(-3.0)).item() - math.log(0.5)]])
    torch.testing.assert_close(readout.evidence(values, indices), expected)


def test_token_moves_touch_only_their_tokens_and_rows():
    logits = torch.zeros(2, 3, 40)
    evidence = torch.tensor([[-1.0, 0.0, -2.0, -0.5], [-3.0, -1.0, 0.0, 0.0]])
    rows = torch.tensor([[False, True, True], [False, False, True]])
    out = add_token_moves(logits, 2.0 * evidence, WORD_TOKENS, rows)
    expected = torch.zeros(2, 3, 40)
    expected[0, 1:, WORD_TOKENS] = 2.0 * evidence[0]
    expected[1, 2, WORD_TOKENS] = 2.0 * evidence[1]
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="another tokenizer"):
        check_token_ids(WORD_TOKENS, 20, "the word readout")


def test_readout_file_round_trip_and_clear_errors(tmp_path, model, space):
    space.save_pretrained(tmp_path / "space")
    loaded = load_space(tmp_path / "space").word_readout
    for name in ("weight", "bias", "token_ids", "log_prior"):
        assert torch.equal(getattr(loaded, name), getattr(space.word_readout, name))
    with pytest.raises(ValueError, match="fitted for another space"):
        WordReadout.load(tmp_path / "space", n_concepts=32)
    with pytest.raises(FileNotFoundError, match=r"has no word_readout.safetensors \(its word "
                                                r"readout\); fit one .*docs/steering.md") as info:
        WordReadout.load(tmp_path)
    assert "python -m" not in str(info.value)  # the runtime names no training command
    (tmp_path / "space" / READOUT_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="refit"):
        WordReadout.load(tmp_path / "space")
    with pytest.raises(ValueError, match="must not repeat"):
        WordReadout(torch.zeros(4, 2), torch.zeros(2), torch.tensor([5, 5]), torch.zeros(2))


def test_a_readout_holding_nan_is_refused_naming_its_file(tmp_path, space):
    space.save_pretrained(tmp_path / "space")
    tensors = {name: getattr(space.word_readout, name) for name in WordReadout.TENSORS}
    tensors["weight"] = tensors["weight"].clone()
    tensors["weight"][3, 1] = math.nan  # written as a corrupt fit would, past the checks
    save_file(tensors, str(tmp_path / "space" / READOUT_NAME), metadata={"pool": "mean"})
    with pytest.raises(ValueError, match=rf"{READOUT_NAME}: WordReadout.weight holds nan/inf; "
                                         "refit it"):
        WordReadout.load(tmp_path / "space")
    with pytest.raises(ValueError, match="WordReadout.log_prior holds nan/inf"):
        WordReadout(torch.zeros(4, 1), torch.zeros(1), torch.tensor([5]),
                    torch.tensor([-math.inf]))


def test_a_readout_of_another_spaces_width_is_refused_at_attach(model):
    narrow = random_space(model, layer=SITE, n_concepts=64, k=4)
    narrow.word_readout = word_readout(32)  # set in code: no load checked it
    with pytest.raises(ValueError, match="word readout reads 32 concepts but the space has 64"):
        attach(model, narrow, mode="evidence", strength=1.0)


def test_evidence_mode_moves_exactly_the_readout_words_by_the_formula(model, space, batch):
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        with attach(model, space, mode="evidence", image_weight=1.0, strength=2.5):
            steered = model(**batch).logits
    hidden = out.hidden_states[SITE]
    vision, text = prefill_masks(batch["input_ids"], batch["attention_mask"],
                                 torch.tensor([IMAGE_TOKEN]))
    for row in range(2):
        z = space.encode(hidden[row][vision[row]].mean(0, keepdim=True), "vision")
        values, indices = z.topk(4)
        evidence = space.word_readout.evidence(values, indices)[0]
        delta = steered[row] - out.logits[row]
        torch.testing.assert_close(delta[text[row]][:, WORD_TOKENS],
                                   (2.5 * evidence).expand(int(text[row].sum()), -1),
                                   atol=1e-5, rtol=1e-5)
        others = torch.ones(delta.shape[-1], dtype=torch.bool)
        others[WORD_TOKENS] = False
        assert torch.equal(delta[:, others], torch.zeros_like(delta[:, others]))
        assert torch.equal(delta[~text[row]], torch.zeros_like(delta[~text[row]]))
        assert (evidence < 0).any()
    assert torch.equal(model(**batch).logits, out.logits)  # removed: the plain model again


def test_evidence_mode_generates_with_controls_and_zero_strength(model, space, batch):
    def run(**options):
        with attach(model, space, mode="evidence", **options):
            return model.generate(**batch, max_new_tokens=4, do_sample=False,
                                  return_dict_in_generate=True, output_logits=True).logits
    plain = model.generate(**batch, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                           output_logits=True).logits
    with pytest.warns(NoOpSteering, match="strength = 0, affirm = 0 and phrase_strength = 0"):
        unsteered = run(strength=0.0)
    for a, b in zip(unsteered, plain):
        assert torch.equal(a, b)
    own, novision = run(image_weight=1.0, strength=3.0), run(image_weight=0.0, strength=3.0)
    other = run(image_weight=1.0, strength=3.0, image_source="other")
    assert not torch.allclose(own[0], novision[0]) and not torch.allclose(own[0], other[0])


def test_evidence_mode_needs_a_readout(model):
    bare = random_space(model, layer=SITE, n_concepts=64, k=4)
    with pytest.raises(ValueError, match=r"needs a space with a word readout \(word_readout."
                                         r"safetensors beside it\); this space has none: fit "
                                         r"one .*docs/steering.md") as info:
        attach(model, bare, mode="evidence")
    assert "python -m" not in str(info.value)
    with pytest.raises(ValueError, match="strength must be >= 0"):
        attach(model, bare, mode="evidence", strength=-1.0)
    bare.word_readout = WordReadout(torch.zeros(64, 1), torch.zeros(1), torch.tensor([10**6]),
                                    torch.zeros(1))
    with pytest.raises(ValueError, match="the word readout names token id 1000000"):
        attach(model, bare, mode="evidence")


@torch.no_grad()
def test_affirm_moves_the_affirming_tokens_by_the_asked_words_log_ratio(model, space):
    torch.manual_seed(4)
    asked_rows = [llava_prompt([11, 6, 17]), llava_prompt([9, 10])]  # row 0 asks about 11 and 17
    batch = {**left_pad(asked_rows), "pixel_values": torch.randn(2, 3, 32, 32)}
    affirm_ids = (3, 25)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        with attach(model, space, mode="evidence", strength=0.0, affirm=0.5,
                    affirm_token_ids=affirm_ids):
            steered = model(**batch).logits
    vision, text = prefill_masks(batch["input_ids"], batch["attention_mask"],
                                 torch.tensor([IMAGE_TOKEN]))
    hidden = out.hidden_states[SITE]
    shifts = []
    for row, asked in ((0, [0, 2]), (1, [])):  # positions of 11 and 17 in WORD_TOKENS
        z = space.encode(hidden[row][vision[row]].mean(0, keepdim=True), "vision")
        values, indices = z.topk(4)
        log_ratio = space.word_readout.log_ratio(values, indices)[0]
        delta = steered[row] - out.logits[row]
        expected = 0.5 * log_ratio[asked].sum()
        shifts.append(float(expected.detach()))
        for token in affirm_ids:
            torch.testing.assert_close(delta[text[row], token],
                                       expected.expand(int(text[row].sum())),
                                       atol=1e-5, rtol=1e-5)
        others = torch.ones(delta.shape[-1], dtype=torch.bool)
        others[list(affirm_ids)] = False
        assert torch.equal(delta[:, others], torch.zeros_like(delta[:, others]))  # strength 0
    assert shifts[0] != 0.0 and shifts[1] == 0.0  # only the row that asks moves
    with pytest.raises(ValueError, match="affirm_token_ids"):
        attach(model, space, mode="evidence", affirm=1.0)
    with pytest.raises(TypeError, match="affirm is an option of evidence; .*mode 'shift' takes"):
        attach(model, space, mode="shift", affirm=1.0, affirm_token_ids=(3,))
    with pytest.raises(ValueError, match="affirm_token_ids names token id 99999"):
        attach(model, space, mode="evidence", affirm=1.0, affirm_token_ids=(99999,))


def test_attach_takes_the_steering_the_space_recommends(model, space, batch):
    """``space.recommended_steering`` (its steering.json) fills every option the caller leaves
    out; the caller's own options win; an unknown recommended option is a clear error, not
    silently dropped."""
    recommended = random_space(model, layer=SITE, n_concepts=64, k=4)
    recommended.load_state_dict(space.state_dict())
    recommended.word_readout = space.word_readout
    recommended.recommended_steering = {"mode": "evidence", "strength": 2.5}
    with torch.no_grad():
        plain = model(**batch).logits
        with attach(model, space, mode="evidence", strength=2.5):
            explicit = model(**batch).logits
        with attach(model, recommended) as handle:
            options = handle.options
            assert (handle.mode, options.strength, options.image_weight) == ("evidence", 2.5, 1.0)
            assert torch.equal(model(**batch).logits, explicit)
        with attach(model, recommended, strength=1.0, image_weight=0.0) as handle:
            options = handle.options
            assert (handle.mode, options.strength, options.image_weight) == ("evidence", 1.0, 0.0)
        with attach(model, space) as handle:  # nothing recommended: the reference's contrast
            assert handle.mode == "contrast" and handle.options == ContrastOptions()
        with attach(model, recommended, mode="shift") as handle:  # another mode: its defaults
            assert (handle.mode, handle.options) == ("shift", ShiftOptions())
    recommended.recommended_steering = {"alpha": 0.3, "contrast_weight": 0.25}  # no mode named
    for mode in (None, "contrast"):  # the default mode is the one it recommends for
        with attach(model, recommended, mode=mode) as handle:
            assert handle.options == ContrastOptions(alpha=0.3, contrast_weight=0.25)
    recommended.recommended_steering = {"mode": "evidence", "strenght": 2.5}
    with pytest.raises(ValueError, match=r"recommends unknown steering options \['strenght'\]"):
        attach(model, recommended)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain)  # nothing was left attached
