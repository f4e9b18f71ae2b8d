"""Grounding mode: the per-patch readout's exact moves on the logits (words, and objects after an
attribute), its controls, the cache, batching, the file, and clear errors."""

import math
import warnings

import pytest
import torch
from helpers.grounding import attribute_batch, logits_of, masks
from helpers.grounding import grounding_moves_by_hand as expected_moves
from helpers.spaces import patch_readout, space_with_patch_readout

from vlsae_hooks import GroundingOptions, PatchReadout, attach
from vlsae_hooks.modes.registry import NoOpSteering
from vlsae_hooks.patch_readout import PATCH_READOUT_NAME
from vlsae_hooks.spaces import load_space
from vlsae_hooks.testing import left_pad, llava_prompt, random_space

torch.set_num_threads(1)
D = 64  # the tiny LLaVA's width


@pytest.fixture(scope="module")
def space(model):
    return space_with_patch_readout(model)


@pytest.fixture(scope="module")
def batch():
    return attribute_batch()


def test_moves_are_exactly_the_readouts_evidence_and_remove_restores(model, space, batch):
    with torch.no_grad():
        plain = model(**batch, output_hidden_states=True)
    ids = batch["input_ids"]
    vision, text = masks(batch)
    for strength, tau, weight in ((4.0, 1.0, 1.0), (2.5, 0.3, 1.0), (3.0, 1.0, 0.0)):
        steered = logits_of(model, space, batch, strength=strength, threshold=tau,
                            image_weight=weight)
        expected = expected_moves(space.patch_readout, plain.hidden_states[0], vision, text, ids,
                                  strength, tau, weight)
        torch.testing.assert_close((steered - plain.logits).double(), expected, atol=2e-5, rtol=0)
        assert expected[..., 67].ne(expected[..., 67].max()).any()  # phrases move differently
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain.logits)  # removed: the plain model again


def test_no_vision_reads_every_patch_as_the_mean_and_wrong_image_takes_the_next_rows(
        model, space, batch):
    with torch.no_grad():
        plain = model(**batch).logits
    novision = logits_of(model, space, batch, image_weight=0.0) - plain
    readout = space.patch_readout
    # both rows end on a token that is no attribute: only the word moves, from the bias alone
    word = 4.0 * torch.nn.functional.logsigmoid(readout.bias).clamp(max=0)
    for row in range(2):
        torch.testing.assert_close(novision[row, -1, [53, 121, 67, 35]], word, atol=1e-5, rtol=0)
    own = logits_of(model, space, batch) - plain
    other = logits_of(model, space, batch, image_source="other") - plain
    torch.testing.assert_close(other[0, -1], own[1, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(other[1, -1], own[0, -1], atol=1e-5, rtol=0)
    assert not torch.allclose(own[0, -1], own[1, -1])
    with pytest.raises(ValueError, match="needs a batch with at least two different images"):
        logits_of(model, space, {k: v[:1] for k, v in batch.items()}, image_source="other")
    # at image_weight 0 every row reads the mean state, but the images still differ
    torch.testing.assert_close(logits_of(model, space, batch, image_weight=0.0,
                                         image_source="other") - plain, novision, atol=1e-6,
                               rtol=0)
    # a text-only row between the two is no image to take: row 0 still gets row 2's (own row 1's)
    mixed = left_pad([llava_prompt([5, 53, 7, 121, 8]), [1, 3, 5, 6, 7, 8],
                      llava_prompt([11, 9])])
    mixed = {**mixed, "pixel_values": batch["pixel_values"]}
    with torch.no_grad():
        plain = model(**mixed).logits
    other = logits_of(model, space, mixed, image_source="other") - plain
    torch.testing.assert_close(other[0, -1], own[1, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(other[2, -1], own[0, -1], atol=1e-5, rtol=0)
    assert torch.equal(other[1], torch.zeros_like(other[1]))  # the text-only row: unsteered


def test_the_cutoff_keeps_the_tokens_plausible_after_the_moves_and_greedy_is_unchanged(
        model, space, batch):
    """Tokens with p < cutoff * max p under the moved logits become -inf, the others keep
    their moved logit exactly; positions before the image stay plain; greedy decodes the same."""
    with torch.no_grad():
        plain = model(**batch).logits
    moved = logits_of(model, space, batch)
    cut = logits_of(model, space, batch, plausibility_cutoff=0.9)
    _, text = masks(batch)
    keep = moved >= moved.amax(-1, keepdim=True) + math.log(0.9)
    kept, dropped = text[..., None] & keep, text[..., None] & ~keep
    assert kept.any() and dropped.any()
    assert torch.equal(cut[kept], moved[kept]) and torch.isneginf(cut[dropped]).all()
    assert torch.equal(cut[~text], plain[~text])
    with torch.no_grad():
        answers = []
        for options in ({}, {"plausibility_cutoff": 0.9}):
            with attach(model, space, mode="grounding", **options):
                answers.append(model.generate(**batch, max_new_tokens=6, do_sample=False))
    assert torch.equal(answers[0], answers[1])


FORCED = [53, 67, 121, 21, 35, 11, 35]
"""Tokens forced while decoding: each step after an attribute moves the objects by phrases."""


@pytest.mark.parametrize("cache", [True, False])
def test_every_decoding_step_moves_by_the_token_before_it(model, space, batch, cache):
    width = batch["input_ids"].shape[1]

    def force(row, ids):
        return [FORCED[ids.shape[-1] - width]]

    def run():
        return model.generate(**batch, max_new_tokens=len(FORCED), use_cache=cache,
                              prefix_allowed_tokens_fn=force, return_dict_in_generate=True,
                              output_logits=True, do_sample=False)

    with torch.no_grad():
        plain = run()
        with attach(model, space, mode="grounding", strength=2.0, threshold=0.7):
            steered = run()
        hidden = model(**batch, output_hidden_states=True).hidden_states[0]
    ids = steered.sequences
    assert ids[0, width:].tolist() == FORCED
    vision, text = masks(batch)
    grown = torch.ones(2, len(FORCED), dtype=torch.bool)
    expected = expected_moves(space.patch_readout, hidden, vision, torch.cat([text, grown], 1),
                              ids, 2.0, 0.7)
    for step, (a, b) in enumerate(zip(steered.logits, plain.logits)):
        torch.testing.assert_close((a - b).double(), expected[:, width - 1 + step], atol=2e-5,
                                   rtol=0)


def generate(model, space, inputs, cache, **kwargs):
    with torch.no_grad(), attach(model, space, mode="grounding", strength=6.0):
        return model.generate(**inputs, max_new_tokens=6, use_cache=cache,
                              return_dict_in_generate=True, output_logits=True, **kwargs)


@pytest.mark.parametrize("kwargs", [{"do_sample": False}, {"do_sample": True},
                                    {"do_sample": False, "num_beams": 3}])
def test_generate_with_cache_equals_without(model, space, batch, kwargs):
    runs = []
    for cache in (True, False):
        torch.manual_seed(7)
        runs.append(generate(model, space, batch, cache, **kwargs))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for a, b in zip(runs[0].logits, runs[1].logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_batched_equals_per_sample_and_steering_changes_the_answer(model, space, batch):
    batched = generate(model, space, batch, True, do_sample=False)
    width = batch["input_ids"].shape[1]
    for row in range(2):
        keep = batch["attention_mask"][row].bool()
        alone = {"input_ids": batch["input_ids"][row:row + 1, keep],
                 "attention_mask": batch["attention_mask"][row:row + 1, keep],
                 "pixel_values": batch["pixel_values"][row:row + 1]}
        single = generate(model, space, alone, True, do_sample=False)
        assert torch.equal(single.sequences[0, int(keep.sum()):], batched.sequences[row, width:])
        for a, b in zip(single.logits, batched.logits):
            torch.testing.assert_close(a[0], b[row], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        plain = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert not torch.equal(plain, batched.sequences)


def test_file_round_trip_and_readout_path(tmp_path, model, space, batch):
    readout = patch_readout(layer=1, supervision="captions")
    path = readout.save(tmp_path / "alone")
    assert path.name == PATCH_READOUT_NAME and path.stat().st_size < 4096
    for source in (tmp_path / "alone", path):
        loaded = PatchReadout.load(source)
        assert (loaded.layer, loaded.supervision) == (1, "captions")
        for name in PatchReadout.TENSORS:
            assert torch.equal(getattr(loaded, name), getattr(readout, name))
    space.save_pretrained(tmp_path / "space")
    assert torch.equal(load_space(tmp_path / "space").patch_readout.weight,
                       space.patch_readout.weight)
    bare = random_space(model, layer=2, n_concepts=64, k=4)
    torch.testing.assert_close(logits_of(model, bare, batch, readout=str(tmp_path / "space")),
                               logits_of(model, space, batch))
    with pytest.raises(FileNotFoundError, match=r"has no patch_readout.safetensors \(its patch "
                                                r"readout\); fit one .*docs/steering.md"):
        PatchReadout.load(tmp_path)
    with pytest.raises(ValueError, match="needs a patch readout: the space has none"):
        attach(model, bare, mode="grounding")
    path.write_bytes(b"truncated")
    with pytest.raises(ValueError, match="refit"):
        PatchReadout.load(path)


def test_bad_inputs_are_refused_clearly(model, space):
    bare = random_space(model, layer=2, n_concepts=64, k=4)
    bare.patch_readout = patch_readout(d=32)
    with pytest.raises(ValueError, match="reads 32-wide states but the model's decoder layers "
                                         "are 64 wide"):
        attach(model, bare, mode="grounding")
    bare.patch_readout = patch_readout(unit_token_ids=torch.tensor([[53, 11], [121, -1],
                                                                   [200, 21], [35, -1]]))
    with pytest.raises(ValueError, match="the patch readout names token id 200 .* another "
                                         "tokenizer"):
        attach(model, bare, mode="grounding")
    for tau in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"GroundingOptions\.threshold must lie in \(0, 1\]"):
            attach(model, space, mode="grounding", threshold=tau)
    with pytest.raises(ValueError, match=r"GroundingOptions\.strength must be a finite number"):
        attach(model, space, mode="grounding", strength=math.nan)
    with pytest.raises(ValueError, match="layer 9 out of range for 4 decoder layers"):
        attach(model, space, mode="grounding", layer=9)
    with pytest.warns(UserWarning, match="readout was fitted at the input of layer 0"), \
            attach(model, space, mode="grounding", layer=-1) as handle:
        assert handle.site_layer == 3
    with pytest.warns(NoOpSteering, match="grounding with strength = 0"), \
            attach(model, space, mode="grounding", strength=0.0):
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with attach(model, space, mode="grounding") as handle:
            assert handle.site_layer == 0 and type(handle.options) is GroundingOptions


@pytest.mark.parametrize("changes, message", [
    ({"unit_token_ids": torch.tensor([[53, 11], [11, -1], [67, 21], [35, -1]])}, "twice"),
    ({"unit_token_ids": torch.tensor([[53, 11], [-1, -1], [67, 21], [35, -1]])},
     r"units \[1\] are spelled by no token"),
    ({"unit_token_ids": torch.tensor([[53, -2], [121, -1], [67, 21], [35, -1]])}, "padding is -1"),
    ({"std": torch.zeros(D)}, "std must be > 0"),
    ({"weight": torch.full((D, 4), math.nan)}, "weight holds nan"),
    ({"bias": torch.zeros(3)}, r"bias has shape \(3,\), expected \(4,\)"),
    ({"is_attribute": torch.ones(5, dtype=torch.bool)}, "is_attribute has shape"),
])
def test_patch_readout_refuses_inconsistent_tensors(changes, message):
    with pytest.raises(ValueError, match=message):
        patch_readout(**changes)
    with pytest.raises(ValueError, match="supervision must be one of"):
        PatchReadout(*(getattr(patch_readout(), n) for n in PatchReadout.TENSORS),
                     supervision="masks")
    with pytest.raises(ValueError, match="layer must be a decoder layer index"):
        patch_readout(layer=-1)
