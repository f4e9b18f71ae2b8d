"""The word readout's parts, exactly: caption bags, which tokens are read out and in what order,
the targets, the held-out AUC, the vision codes it reads and the fit's start, penalty and seed."""

import math
from pathlib import Path

import pytest
import torch
from helpers.activations import write_shard_of
from helpers.spaces import small_space

from eval_suites.toyworld.build import build_llava_processor
from sae_training.config import ReadoutConfig
from sae_training.readout import (
    bag_targets,
    caption_phrase_bags,
    caption_token_bags,
    choose_tokens,
    fit_readout,
    mean_auc,
    token_aucs,
    vision_codes,
)
from sae_training.store import ActivationStore
from vlsae_hooks.phrase_evidence import PhraseReadout

torch.set_num_threads(1)


def config(**changes) -> ReadoutConfig:
    return ReadoutConfig(space="s", data="d", tokenizer="t", **changes)


def test_caption_bags_are_the_captions_own_tokens_and_adjacent_pairs() -> None:
    tokenizer = build_llava_processor().tokenizer
    red, star, blue = tokenizer.convert_tokens_to_ids(["red", "star", "blue"])
    bags = caption_token_bags(["red star", "blue"], tokenizer)
    assert bags == [{red, star}, {blue}]  # no BOS: it would be a token of every caption
    assert caption_phrase_bags(["red star blue", "blue"], tokenizer) == [
        {(red, star), (star, blue)}, set()]


def test_choose_tokens_keeps_the_counts_in_bounds_most_frequent_first() -> None:
    counts = {1: 10, 2: 5, 3: 3, 4: 3, 5: 2, 6: 1}  # token: captions of the 10 it is in
    bags = [{t for t, c in counts.items() if i < c} for i in range(10)]
    cfg = config(min_count=2, max_doc_freq=0.5)  # 2 <= count <= 5 of the 10
    assert choose_tokens(bags, cfg).tolist() == [2, 3, 4, 5]  # ties: the smaller id first
    assert choose_tokens(bags, config(min_count=2, max_doc_freq=0.5, max_tokens=3)).tolist() == [
        2, 3, 4]
    phrases = [{(1, 2), (2, 3)}, {(1, 2)}, {(2, 3), (4, 5)}]
    assert choose_tokens(phrases, config(min_count=2, max_doc_freq=0.9)).tolist() == [
        [1, 2], [2, 3]]
    with pytest.raises(ValueError, match="between 11 and 5 of the 10 captions"):
        choose_tokens(bags, config(min_count=11, max_doc_freq=0.5))


def test_bag_targets_mark_every_unit_a_caption_holds() -> None:
    targets = bag_targets([{1, 2, 7}, {2}, {9}], torch.tensor([2, 1, 7]))
    assert targets.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    phrases = bag_targets([{(1, 2), (2, 3)}, {(2, 1)}], torch.tensor([[2, 3], [1, 2], [2, 1]]))
    assert phrases.tolist() == [[1, 1, 0], [0, 0, 1]]


def test_token_aucs_are_the_roc_auc_and_nan_without_both_classes() -> None:
    scores = torch.tensor([[0.1, 0.1, 0.3, 0.2], [0.4, 0.9, 0.5, 0.6],
                           [0.35, 0.3, 0.7, 0.1], [0.8, 0.5, 0.2, 0.4]])
    targets = torch.tensor([[0, 0, 1, 0], [1, 1, 1, 0], [1, 0, 1, 0], [0, 1, 1, 0]]).float()
    aucs = token_aucs(scores, targets)  # column 0: 2 of its 4 pairs ranked right
    assert aucs[:2].tolist() == [0.5, 1.0] and aucs[2:].isnan().all()  # all 1s, all 0s
    assert mean_auc(scores, targets) == 0.75
    assert token_aucs(torch.tensor([[0.2], [0.1], [0.9], [0.5]]),
                      torch.tensor([[1.0], [0.0], [1.0], [0.0]])).item() == 0.75


def test_vision_codes_are_the_spaces_vision_side_codes(tmp_path: Path) -> None:
    space = small_space(has_aligner=True)  # the aligner projects each side its own way
    rows = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    write_shard_of(tmp_path / "acts", rows, ["a caption"] * 5, None)
    values, indices = vision_codes(space, ActivationStore(tmp_path / "acts"), batch_size=2)
    expected_values, expected_indices = space.encode_sparse(rows, "vision")
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(values, expected_values.float())
    assert not torch.equal(indices, space.encode_sparse(rows, "text")[1])


def planted_codes(n: int = 64, h: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [n, h] and targets [n, 2]: token 0 (in about 10% of the captions) shown by concept
    0, token 1 (about 70%) by concept 1."""
    g = torch.Generator().manual_seed(0)
    codes = torch.rand(n, h, generator=g)
    return codes, (codes[:, :2] > torch.tensor([0.8, 0.3])).float()


def test_a_fit_starts_at_the_prior_and_records_it() -> None:
    codes, targets = planted_codes()
    cfg = config(epochs=3, batch_size=64)  # one batch: the prior's bias has no gradient
    readout = fit_readout(lambda rows: torch.zeros(len(rows), 8), torch.arange(64), targets,
                          torch.tensor([5, 6]), 8, cfg)
    prior = targets.mean(0)
    assert prior.tolist() == [0.09375, 0.6875]  # Adam moves a rounding error's gradient <= lr
    torch.testing.assert_close(readout.bias, torch.log(prior / (1 - prior)), atol=0.03, rtol=0)
    torch.testing.assert_close(readout.log_prior, prior.log())
    assert readout.pool == "mean" and not readout.weight.any()
    assert readout.token_ids.tolist() == [5, 6]


def test_a_fit_is_seeded_and_penalised() -> None:
    codes, targets = planted_codes()

    def fit(seed: int = 0, l2: float = 0.0, global_seed: int = 0):
        torch.manual_seed(global_seed)  # the fit's draws must not depend on it
        cfg = config(epochs=5, batch_size=16, lr=0.1, l2=l2, seed=seed)
        return fit_readout(lambda rows: codes[rows], torch.arange(64), targets,
                           torch.tensor([[5, 6], [6, 7]]), 8, cfg, pool="max_scores")

    first, again, other = fit(), fit(global_seed=1), fit(seed=1)
    assert isinstance(first, PhraseReadout) and first.pool == "max_scores"
    assert torch.equal(first.weight, again.weight) and torch.equal(first.bias, again.bias)
    assert not torch.equal(first.weight, other.weight)
    penalised = fit(l2=1000.0)  # on the mean squared weight
    assert penalised.weight.norm() < 0.5 * first.weight.norm()
    assert math.isfinite(float(penalised.bias.sum()))
