"""The word and phrase readouts' own checks and arithmetic, by hand: misshapen tensors refused,
dense logits and log ratios of any dtype's codes, a save that fails keeping the previous file, a
file without a pool read as "mean", a fit record naming other space weights refused (one naming
these, or none, trusted), files missing a tensor, and the vocabulary's bounds."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.spaces import space_with_readouts
from safetensors.torch import save_file

from vlsae_hooks.phrase_evidence import PhraseReadout
from vlsae_hooks.word_evidence import FINGERPRINT, WordReadout, check_token_ids

torch.set_num_threads(1)


def two_words(**changes) -> WordReadout:
    fields = {"weight": torch.tensor([[1.0, -2.0], [0.5, 0.0]]), "bias": torch.tensor([0.0, 1.0]),
              "token_ids": torch.tensor([7, 3]), "log_prior": torch.log(torch.tensor([0.5, 0.2]))}
    return WordReadout(**{**fields, **changes})


@pytest.mark.parametrize("changes, message", [
    ({"weight": torch.zeros(2)}, r"WordReadout\.weight must be \[n_concepts, n_tokens\], got "
                                 r"\(2,\)"),
    ({"bias": torch.zeros(3)}, r"WordReadout\.bias has shape \(3,\), expected \(2,\)"),
    ({"token_ids": torch.tensor([[7, 3]])}, r"WordReadout\.token_ids has shape \(1, 2\)"),
    ({"log_prior": torch.zeros(1)}, r"WordReadout\.log_prior has shape \(1,\)"),
])
def test_misshapen_tensors_are_refused_naming_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        two_words(**changes)
    with pytest.raises(ValueError, match=r"PhraseReadout\.first_ids has shape \(3,\), expected "
                                         r"\(2,\)"):
        PhraseReadout(torch.zeros(4, 2), torch.zeros(2), torch.tensor([5, 6]), torch.zeros(2),
                      torch.tensor([1, 2, 3]))


def test_dense_logits_and_log_ratios_by_hand_whatever_the_codes_dtype():
    readout = two_words()
    codes = torch.tensor([[2.0, 1.0], [0.0, -2.0]])
    # word 7: 2*1 + 1*0.5 + 0 = 2.5, then -1; word 3: 2*(-2) + 0 + 1 = -3, then 1
    logits = torch.tensor([[2.5, -3.0], [-1.0, 1.0]])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        out = readout.logits_dense(codes.to(dtype))
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, logits)
    ratio = F.logsigmoid(logits) - torch.log(torch.tensor([0.5, 0.2]))
    torch.testing.assert_close(readout.log_ratio_dense(codes.double()), ratio)


def test_a_save_that_fails_keeps_the_previous_file(tmp_path, monkeypatch):
    first = two_words()
    first.save(tmp_path)

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("vlsae_hooks.tensor_files.save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        two_words(bias=torch.tensor([5.0, 5.0])).save(tmp_path)
    assert torch.equal(WordReadout.load(tmp_path).bias, first.bias)


def test_a_file_without_a_pool_or_a_tensor(tmp_path):
    readout = two_words()
    tensors = {name: getattr(readout, name) for name in WordReadout.TENSORS}
    save_file(tensors, str(tmp_path / WordReadout.FILE))  # written before pools were recorded
    assert WordReadout.load(tmp_path).pool == "mean"
    del tensors["log_prior"]
    save_file(tensors, str(tmp_path / WordReadout.FILE))
    with pytest.raises(ValueError, match=r"word_readout.safetensors lacks \['log_prior'\]; "
                                         "refit it"):
        WordReadout.load(tmp_path)


def test_a_fit_record_naming_other_space_weights_is_refused(tmp_path, model):
    space_with_readouts(model).save_pretrained(tmp_path)
    weights = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    for cls in (WordReadout, PhraseReadout):
        record = tmp_path / Path(cls.FILE).with_suffix(".json").name
        record.write_text(json.dumps({FINGERPRINT: "0" * 64, "auc": 0.9}))
        with pytest.raises(ValueError, match=rf"{cls.FILE} was fitted on other weights than "
                                             r".*model.safetensors \(the space was retrained"):
            cls.load(tmp_path, 64)
        record.write_text(json.dumps({FINGERPRINT: weights}))
        assert cls.load(tmp_path, 64).n_concepts == 64
        record.write_text(json.dumps({"auc": 0.9}))  # no fingerprint: trusted
        cls.load(tmp_path, 64)


def test_token_ids_must_lie_in_the_vocabulary():
    check_token_ids(torch.tensor([0, 19]), 20, "the readout")  # both ends are tokens
    check_token_ids(torch.tensor([], dtype=torch.long), 20, "the readout")
    with pytest.raises(ValueError, match="the readout names token id 20 but the model's "
                                         "vocabulary has 20 tokens"):
        check_token_ids(torch.tensor([3, 20]), 20, "the readout")
    with pytest.raises(ValueError, match="the readout names token id -1: token ids are >= 0"):
        check_token_ids(torch.tensor([-1, 3]), 20, "the readout")
