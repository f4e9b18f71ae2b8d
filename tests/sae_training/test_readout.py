"""Fitting a space's word readout: it learns which caption words an image's concepts show, and
learns nothing from captions shuffled away from their images."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.activations import WORDS, D, N, write_pairs, write_shard_of
from helpers.spaces import lexvla_space
from helpers.spies import record_calls, record_results

from eval_suites.toyworld.build import build_llava_processor
from sae_training import readout
from sae_training.cli import main
from sae_training.config import ReadoutConfig
from sae_training.extractors import codes_label
from sae_training.readout import bag_targets, caption_phrase_bags, caption_token_bags
from sae_training.store import ActivationStore
from vlsae_hooks.spaces import VLSAE, SpaceConfig, VLSAESpace, load_space
from vlsae_hooks.word_evidence import READOUT_NAME

torch.set_num_threads(1)


@pytest.fixture()
def space_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    config = SpaceConfig(kind="vlsae", d_model=D, n_concepts=128, k=16, model_name="toy",
                         model_type="llava", site="layer_input", layer=0, has_aligner=False)
    VLSAESpace(VLSAE(D, 128, 16), None, config).save_pretrained(tmp_path / "space")
    build_llava_processor().save_pretrained(tmp_path / "tokenizer")
    return tmp_path


@pytest.mark.parametrize("shuffle", [False, True])
def test_readout_learns_the_words_the_concepts_show(space_dir: Path, shuffle: bool, capsys) -> None:
    write_pairs(space_dir / "acts", shuffle)
    (space_dir / "space" / READOUT_NAME).write_bytes(b"a broken earlier fit")  # refitting mends it
    args = ["readout", "--space", str(space_dir / "space"), "--data", str(space_dir / "acts"),
            "--tokenizer", str(space_dir / "tokenizer"), "--min-count", "10", "--epochs", "40"]
    main(args)
    metrics = json.loads((space_dir / "space" / "word_readout.json").read_text())
    readout = load_space(space_dir / "space").word_readout
    assert metrics["pool"] == readout.pool == "mean"  # read from the mean states' codes
    assert metrics["n_val"] == 40 and readout.weight.shape == (128, metrics["n_tokens"])
    if shuffle:  # no word is predictable from its image: chance lifts few over min AUC 0.6
        assert abs(metrics["val_mean_auc"] - 0.5) < 0.15
        assert len(metrics["dropped_tokens"]) >= 4
        with pytest.raises(SystemExit, match="paired with their images"):
            main(args + ["--min-auc", "0.9"])
    else:  # "there", "is", "and" are in most captions; every colour is read
        assert sorted(metrics["tokens"]) == sorted(WORDS) and metrics["dropped_tokens"] == []
        assert metrics["val_mean_auc"] > 0.85
        assert metrics["val_bce"] < metrics["val_bce_prior_only"]
    assert "held-out mean AUC" in (space_dir / "acts" / "readout.log").read_text()
    assert '"val_mean_auc"' in capsys.readouterr().out


def fit_args(space_dir: Path, data: str = "acts", *extra: str) -> list[str]:
    return ["readout", "--space", str(space_dir / "space"), "--data", str(space_dir / data),
            "--tokenizer", str(space_dir / "tokenizer"), "--min-count", "10", *extra]


def store_bags(folder: Path, bags=caption_token_bags) -> list[set]:
    """The bags of every caption of the extraction in ``folder``, in its row order."""
    store = ActivationStore(folder)
    captions = [caption for _, caption in store.captions(torch.arange(len(store)))]
    return bags(captions, build_llava_processor().tokenizer)


def test_the_fit_reads_only_the_fitted_captions_and_scores_the_held_out_rest(
        space_dir: Path, monkeypatch) -> None:
    write_pairs(space_dir / "acts", shuffle=False)
    calls = record_calls(monkeypatch, readout, "choose_tokens", "fit_readout")
    main(fit_args(space_dir, "acts", "--epochs", "40"))
    (_, (chosen_from, _)), (_, (_, rows, targets, token_ids, *_)) = calls
    bags = store_bags(space_dir / "acts")
    fitted = rows.tolist()
    held_out = sorted(set(range(N)) - set(fitted))
    assert len(set(fitted)) == len(fitted) == N - 40 and len(held_out) == 40
    assert chosen_from == [bags[i] for i in fitted]  # tokens chosen on the fitted captions only
    assert torch.equal(targets, bag_targets([bags[i] for i in fitted], token_ids))
    metrics = json.loads((space_dir / "space" / "word_readout.json").read_text())
    assert (metrics["n_train"], metrics["n_val"], metrics["dropped_tokens"]) == (760, 40, [])
    held_targets = bag_targets([bags[i] for i in held_out], token_ids)
    bias = load_space(space_dir / "space").word_readout.bias
    assert metrics["val_bce_prior_only"] == pytest.approx(float(
        F.binary_cross_entropy_with_logits(bias.expand_as(held_targets), held_targets)), rel=1e-5)


def test_tokens_below_min_auc_are_dropped_and_unscorable_ones_kept(space_dir: Path,
                                                                   monkeypatch) -> None:
    write_pairs(space_dir / "acts", shuffle=False)
    aucs = torch.tensor([0.6, 0.59, math.nan, 0.9, 0.1, 0.7], dtype=torch.float64)
    monkeypatch.setattr(readout, "token_aucs", lambda scores, targets: aucs)
    calls = record_results(monkeypatch, readout, "choose_tokens")
    main(fit_args(space_dir, "acts", "--epochs", "2", "--min-auc", "0.6"))
    chosen = calls[0][2]
    names = build_llava_processor().tokenizer.convert_ids_to_tokens(chosen.tolist())
    metrics = json.loads((space_dir / "space" / "word_readout.json").read_text())
    assert metrics["dropped_tokens"] == [names[1], names[4]]  # 0.6 is kept, nan is kept
    assert metrics["tokens"] == [names[i] for i in (0, 2, 3, 5)] and metrics["n_tokens"] == 4
    assert load_space(space_dir / "space").word_readout.token_ids.tolist() == [
        chosen[i] for i in (0, 2, 3, 5)]
    assert metrics["val_mean_auc"] == pytest.approx((0.6 + 0.59 + 0.9 + 0.1 + 0.7) / 5)


def test_a_single_held_out_caption_scores_no_auc_and_writes_plain_json(space_dir: Path) -> None:
    write_pairs(space_dir / "acts", shuffle=False)
    main(fit_args(space_dir, "acts", "--epochs", "2", "--val-fraction", "0.001"))
    text = (space_dir / "space" / "word_readout.json").read_text()
    metrics = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the json"))
    assert (metrics["n_train"], metrics["n_val"]) == (N - 1, 1)  # one caption held out
    assert metrics["val_mean_auc"] is None and metrics["dropped_tokens"] == []


def test_readout_config_errors(space_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_doc_freq"):
        ReadoutConfig(space="s", data="d", tokenizer="t", max_doc_freq=1.5)
    with pytest.raises(ValueError, match="min_auc"):
        ReadoutConfig(space="s", data="d", tokenizer="t", min_auc=1.0)
    write_pairs(space_dir / "acts", shuffle=False)
    with pytest.raises(SystemExit, match="no caption token"):
        main(["readout", "--space", str(space_dir / "space"), "--data", str(space_dir / "acts"),
              "--tokenizer", str(space_dir / "tokenizer"), "--min-count", "10000"])
    write_pairs(space_dir / "narrow", shuffle=False, width=D // 2)
    with pytest.raises(SystemExit, match="16-wide activations, .* not the data it was trained"):
        main(fit_args(space_dir, "narrow"))
    assert not (space_dir / "narrow" / "readout.log").exists()  # refused: --data as it was
    lexvla_space([5, 6, 7]).save_pretrained(space_dir / "lexical")
    with pytest.raises(SystemExit, match="'lexvla' space; a word readout reads VL-SAE concept"):
        main(["readout", "--space", str(space_dir / "lexical"), *fit_args(space_dir)[3:]])
    assert not (space_dir / "space" / READOUT_NAME).exists()


def test_readout_on_pooled_codes_is_a_max_pooled_readout(space_dir: Path) -> None:
    label = codes_label(space_dir / "space")
    write_pairs(space_dir / "codes", shuffle=False, codes_of=label, width=128)
    main(["readout", "--space", str(space_dir / "space"), "--data", str(space_dir / "codes"),
          "--tokenizer", str(space_dir / "tokenizer"), "--min-count", "10", "--epochs", "40"])
    metrics = json.loads((space_dir / "space" / "word_readout.json").read_text())
    assert metrics["pool"] == "max" and metrics["val_mean_auc"] > 0.85
    assert load_space(space_dir / "space").word_readout.pool == "max"
    write_pairs(space_dir / "narrow", shuffle=False, codes_of="other (sha256 1)", width=64)
    with pytest.raises(SystemExit, match="another space's codes"):
        main(["readout", "--space", str(space_dir / "space"), "--data", str(space_dir / "narrow"),
              "--tokenizer", str(space_dir / "tokenizer"), "--min-count", "10"])
    torch.manual_seed(1)  # the space retrained into its folder: the codes are of other weights
    retrained = load_space(space_dir / "space")
    retrained.sae.load_state_dict(VLSAE(D, 128, 16).state_dict())
    retrained.save_pretrained(space_dir / "space")
    before = (space_dir / "space" / READOUT_NAME).read_bytes()
    for codes_of in (label, str(space_dir / "space")):  # an old sha, or none recorded
        write_pairs(space_dir / "stale", shuffle=False, codes_of=codes_of, width=128)
        with pytest.raises(SystemExit, match="codes of other weights"):
            main(["readout", "--space", str(space_dir / "space"), "--data",
                  str(space_dir / "stale"), "--tokenizer", str(space_dir / "tokenizer"),
                  "--min-count", "10"])
        shutil.rmtree(space_dir / "stale")
    assert (space_dir / "space" / READOUT_NAME).read_bytes() == before  # the earlier fit stays


CLASSES = [("red", "star"), ("red", "ring"), ("blue", "star"), ("blue", "ring")]


def write_phrase_scores(folder: Path) -> None:
    """Pooled concept scores of images that each show 1-2 of CLASSES, one direction per class:
    colour and shape words alone cannot say which shape goes with which colour."""
    g = torch.Generator().manual_seed(1)
    directions = torch.randn(len(CLASSES), 128, generator=g)
    shown = torch.rand(N, len(CLASSES), generator=g) < 0.35
    empty = (shown.sum(1) == 0).nonzero()[:, 0]
    shown[empty, empty % len(CLASSES)] = True
    scores = shown.float() @ directions + 0.3 * torch.randn(N, 128, generator=g)
    captions = ["there is " + " and ".join(f"a {c} {s}" for (c, s), on in zip(CLASSES, row) if on)
                for row in shown.tolist()]
    write_shard_of(folder, scores, captions, codes_label(folder.parent / "space"),
                   pool="max_scores")


def test_phrase_readout_learns_which_shape_goes_with_which_colour(space_dir: Path,
                                                                   monkeypatch) -> None:
    write_phrase_scores(space_dir / "scores")
    common = ["--space", str(space_dir / "space"), "--data", str(space_dir / "scores"),
              "--tokenizer", str(space_dir / "tokenizer"), "--min-count", "10", "--epochs", "40",
              "--max-doc-freq", "0.75"]  # each colour and shape is in about 60% of the captions
    with pytest.raises(SystemExit, match="fit the word readout first"):
        main(["readout", "--phrases", *common])
    main(["readout", "--phrases", "--no-phrase-of-words", *common])  # every phrase
    every = json.loads((space_dir / "space" / "phrase_readout.json").read_text())["tokens"]
    assert any(name.startswith("a ") for name in every)
    main(["readout", *common])  # words first: phrases are kept only of the words it reads
    calls = record_calls(monkeypatch, readout, "choose_tokens", "fit_readout")
    main(["readout", "--phrases", *common])
    words = set(load_space(space_dir / "space").word_readout.token_ids.tolist())
    pairs = store_bags(space_dir / "scores", caption_phrase_bags)
    (_, (chosen_from, _)), (_, (_, rows, *_)) = calls
    assert chosen_from == [{p for p in pairs[i] if set(p) <= words} for i in rows.tolist()]
    metrics = json.loads((space_dir / "space" / "phrase_readout.json").read_text())
    space = load_space(space_dir / "space")
    phrases = space.phrase_readout
    assert metrics["pool"] == phrases.pool == "max_scores"
    names = set(metrics["tokens"])
    assert {f"{c} {s}" for c, s in CLASSES} <= names  # "star and": "and" is a word it reads too
    assert not any(name.startswith(("a ", "there", "is ")) for name in names)  # not of words
    assert metrics["val_mean_auc"] > 0.85
    tokenizer = build_llava_processor().tokenizer
    first = tokenizer.convert_tokens_to_ids([c for c, _ in CLASSES])
    second = tokenizer.convert_tokens_to_ids([s for _, s in CLASSES])
    assert set(zip(first, second)) <= set(zip(phrases.first_ids.tolist(),
                                              phrases.token_ids.tolist()))
    assert space.word_readout.pool == "max_scores"
    write_pairs(space_dir / "acts", shuffle=False)
    with pytest.raises(SystemExit, match="--scores"):
        main(["readout", "--phrases", *common[:2], "--data", str(space_dir / "acts"), *common[4:]])
