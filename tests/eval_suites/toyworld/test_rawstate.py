"""The raw-state ablation (a random-projection space fitted by the recipe) and the cutoff-only
control, on the shipped toy LLaVA."""

import functools
import json
import math
import warnings
from dataclasses import asdict

import pytest
import torch
from helpers.toy_llava import toy_inputs

from eval_suites.core.decoder import HFDecoder
from eval_suites.core.methods import METHODS
from eval_suites.toyworld import rawstate
from eval_suites.toyworld.assets_paths import TOY_DIR
from eval_suites.toyworld.spaces import ToySpaceRecipe
from eval_suites.toyworld.world import heldout_scenes
from vlsae_hooks import NoOpSteering
from vlsae_hooks.handle import HANDLE_ATTR
from vlsae_hooks.spaces import VLSAESpace
from vlsae_hooks.word_evidence import space_fingerprint

MODEL = TOY_DIR / "llava"
SHIPPED = MODEL / "vlsae_space"
TINY = functools.partial(ToySpaceRecipe, n_pairs=100)
"""The recipe's defaults at a scale a test can build (the readouts still pass their filters)."""


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """The ablation built at tiny scale into a temporary cache, which stays the one
    ``rawstate_space`` finds while this module runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLSAE_CACHE", str(tmp_path_factory.mktemp("cache")))
        patch.setattr(rawstate, "ToySpaceRecipe", TINY)
        yield rawstate.build_rawstate_space(MODEL, SHIPPED, TINY())


def test_random_projection_is_seeded_shaped_like_the_space_and_encodes_otherwise():
    shipped = VLSAESpace.from_pretrained(SHIPPED)
    space = rawstate.random_projection_space(shipped)
    assert torch.equal(space.sae.concepts, rawstate.random_projection_space(shipped).sae.concepts)
    assert not torch.equal(space.sae.concepts,
                           rawstate.random_projection_space(shipped, seed=1).sae.concepts)
    fields = ("d_model", "n_concepts", "k", "site", "layer", "model_name", "source")
    assert ([getattr(space.config, f) for f in fields]
            == [getattr(shipped.config, f) for f in fields])
    assert space.aligner is None and not space.config.has_aligner
    states = torch.randn(8, shipped.config.d_model, generator=torch.Generator().manual_seed(0))
    _, ours = space.encode_sparse(states, "vision")
    _, theirs = shipped.encode_sparse(states, "vision")
    assert not torch.equal(ours.sort(-1).values, theirs.sort(-1).values)


def test_built_space_records_the_ablation_and_is_reused(tiny_build):
    space = VLSAESpace.from_pretrained(tiny_build)
    shipped = VLSAESpace.from_pretrained(SHIPPED)
    record = space.config.extra["rawstate"]
    assert record["ablation"] == "random-projection"
    assert record["of_space"] == str(SHIPPED)
    assert record["of_space_sha256"] == space_fingerprint(SHIPPED)
    assert record["recipe"] == json.loads(json.dumps(asdict(TINY()), default=str))
    assert torch.equal(space.sae.concepts, rawstate.random_projection_space(shipped).sae.concepts)
    assert min(record["decoder_val_explained_variance"].values()) > 0
    assert space.word_readout is not None and space.phrase_readout is not None
    assert space.recommended_steering == shipped.recommended_steering
    log = tiny_build.with_name(tiny_build.name + ".log")
    lines = log.read_text()
    assert rawstate.build_rawstate_space(MODEL, SHIPPED, TINY()) == tiny_build
    assert log.read_text() == lines  # found in the cache, not built again


@pytest.mark.parametrize("name", ["vlsae", "vlsae-evidence", "vlsae-contrast-novision",
                                  "vlsae-shift-wrongimage"])
def test_rawstate_method_attaches_the_ablation_with_the_same_options(tiny_build, shipped_toy_llava,
                                                                     name):
    model, processor = shipped_toy_llava
    handles, no_ops = {}, {}
    for method in (name, f"{name}-rawstate"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with METHODS[method](model, processor):
                handles[method] = getattr(model, HANDLE_ATTR)
        no_ops[method] = [str(w.message) for w in caught if w.category is NoOpSteering]
    ablation = handles[f"{name}-rawstate"]
    assert ablation.options == handles[name].options
    # the tuned evidence method rests at strength 0 on the toy (no strength beat greedy on the
    # dev seed; EVIDENCE_STEERING): it and its ablation both say they change nothing
    assert no_ops[name] == no_ops[f"{name}-rawstate"]
    assert len(no_ops[name]) == (1 if name == "vlsae-evidence" else 0)
    assert ablation.space.config.extra["rawstate"]["ablation"] == "random-projection"
    assert "rawstate" not in handles[name].space.config.extra


def test_cutoff_keeps_the_plain_logits_above_the_cutoff_and_decodes_greedily(shipped_toy_llava):
    model, processor = shipped_toy_llava
    prompts = ["Describe the image.", "Is there a red star in the image?"]
    inputs = toy_inputs(processor, prompts)
    with torch.no_grad():
        plain = model(**inputs).logits[:, -1]
        with METHODS["vlsae-cutoff"](model, processor):
            cut = model(**inputs).logits[:, -1]
    keep = plain >= plain.max(-1, keepdim=True).values + math.log(0.8)
    assert torch.equal(cut, torch.where(keep, plain, -math.inf))
    images = [scene.image for scene in heldout_scenes(1, 2)]
    greedy = HFDecoder(model, processor, do_sample=False).generate(images, prompts, 16)
    with METHODS["vlsae-cutoff"](model, processor) as decoder:
        assert decoder.generate(images, prompts, 16) == greedy


def test_fitted_decoders_are_the_centred_least_squares_map():
    """With the intercept fitted apart (centred codes and states), each modality's decoded
    training codes average to its training states' mean; the explained variance returned is
    the held-out part's."""
    from vlsae_hooks.testing import random_space, tiny_llava

    space = random_space(tiny_llava(), n_concepts=16, k=16, aligner=False)  # dense codes
    d = space.config.d_model
    generator = torch.Generator().manual_seed(0)
    states = {"vision": torch.randn(400, d, generator=generator),
              "text": torch.randn(400, d, generator=generator) * 2 + 3}

    class Store:  # the two modalities' states, as ActivationStore.get returns them
        def __len__(self) -> int:
            return 400

        def get(self, index):
            return states["vision"][index], states["text"][index]

    explained = rawstate.fit_decoders(space, Store())
    order = torch.randperm(400, generator=torch.Generator().manual_seed(rawstate.SEED))
    n_val = max(2, int(rawstate.VAL_FRACTION * 400))
    val, train = order[:n_val], order[n_val:]
    with torch.no_grad():
        for modality, target in states.items():
            decoded = space.sae.decode(space.sae.encode(target), modality)
            torch.testing.assert_close(decoded[train].mean(0), target[train].mean(0), atol=1e-4,
                                       rtol=0)
            spread = (target[val] - target[val].mean(0)).pow(2).sum()
            assert explained[modality] == pytest.approx(
                float(1 - (decoded[val] - target[val]).pow(2).sum() / spread), abs=1e-4)


def test_a_small_store_still_holds_out_rows_whose_spread_explains():
    """Under 40 rows 5% is less than two rows: two are held out, so the explained variance is a
    number (one row has no spread: it would be -inf)."""
    from vlsae_hooks.testing import random_space, tiny_llava

    space = random_space(tiny_llava(), n_concepts=16, k=16, aligner=False)
    states = torch.randn(12, space.config.d_model, generator=torch.Generator().manual_seed(2))

    class Store:
        def __len__(self) -> int:
            return 12

        def get(self, index):
            return states[index], states[index]

    explained = rawstate.fit_decoders(space, Store())
    assert all(math.isfinite(value) and value <= 1 for value in explained.values()), explained


def test_random_projection_starts_as_the_documented_untrained_space():
    """Concepts a seeded standard Gaussian, both decoders zero, none of the shipped space's
    records carried over, the shipped recommendation kept, in eval mode."""
    shipped = VLSAESpace.from_pretrained(SHIPPED)
    space = rawstate.random_projection_space(shipped, seed=3)
    h, d = shipped.config.n_concepts, shipped.config.d_model
    assert torch.equal(space.sae.concepts,
                       torch.randn(h, d, generator=torch.Generator().manual_seed(3)))
    for modality in ("vision", "text"):
        decoder = space.sae.decoder(modality)
        assert not decoder.weight.any() and not decoder.bias.any(), modality
    assert shipped.config.extra and space.config.extra == {}
    assert shipped.recommended_steering
    assert space.recommended_steering == shipped.recommended_steering
    assert not space.training


def test_fitted_decoders_solve_the_ridge_normal_equations():
    """Each decoder's weight W solves (Cc'Cc + lambda I) W = Cc'Sc on the training rows (codes and
    states centred), lambda = RIDGE times the mean diagonal of Cc'Cc: the ridge, not plain least
    squares."""
    from vlsae_hooks.testing import random_space, tiny_llava

    space = random_space(tiny_llava(), n_concepts=16, k=16, aligner=False)
    generator = torch.Generator().manual_seed(1)
    states = torch.randn(400, space.config.d_model, generator=generator)

    class Store:
        def __len__(self) -> int:
            return 400

        def get(self, index):
            return states[index], states[index] * 2

    rawstate.fit_decoders(space, Store())
    order = torch.randperm(400, generator=torch.Generator().manual_seed(rawstate.SEED))
    train = order[max(2, int(rawstate.VAL_FRACTION * 400)):]
    with torch.no_grad():
        codes = space.sae.encode(states).double()[train]
    codes = codes - codes.mean(0)
    gram = codes.T @ codes
    ridged = gram + rawstate.RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    for modality, scale in (("vision", 1), ("text", 2)):
        target = states[train].double() * scale
        rhs = codes.T @ (target - target.mean(0))
        weight = space.sae.decoder(modality).weight.detach().double().T
        assert float((ridged @ weight - rhs).norm() / rhs.norm()) < 1e-5, modality
        assert float((gram @ weight - rhs).norm() / rhs.norm()) > 1e-4, modality


def test_rawstate_space_brings_the_shipped_patch_readout(tiny_build, shipped_toy_llava):
    from vlsae_hooks.patch_readout import PatchReadout

    model, _ = shipped_toy_llava
    assert not (tiny_build / PatchReadout.FILE).exists()
    ablation = rawstate.rawstate_space(model)
    assert isinstance(ablation.patch_readout, PatchReadout)
    assert ablation.config.extra["rawstate"]["ablation"] == rawstate.ABLATION


def test_rawstate_space_refuses_a_model_with_no_concept_space():
    from vlsae_hooks.testing import tiny_llava

    model = tiny_llava()
    model.name_or_path = "my-llava"
    with pytest.raises(ValueError, match="none is registered for 'my-llava' nor in a "
                                         "'vlsae_space/' folder.*register_space"):
        rawstate.rawstate_space(model)
