"""Evidence mode with a max-pooled word readout: every image position's code read at prefill,
the generated tokens' codes as a running max, the same logits with the cache as without."""

import pytest
import torch
from helpers.spaces import WORD_TOKENS, word_readout

from vlsae_hooks import attach
from vlsae_hooks.pooling import pooled_code, prefill_masks
from vlsae_hooks.spaces import load_space
from vlsae_hooks.testing import IMAGE_TOKEN, random_space
from vlsae_hooks.word_evidence import WordReadout

torch.set_num_threads(1)
SITE = 2


def test_pooled_code_is_the_max_of_each_positions_code(model):
    space = random_space(model, layer=SITE, n_concepts=64, k=4)
    torch.manual_seed(5)
    hidden = torch.randn(2, 5, space.config.d_model)
    mask = torch.tensor([[True, False, True, True, False], [False] * 5])
    pooled = pooled_code(space, hidden, mask, "vision")
    with torch.no_grad():
        dense = space.encode(hidden[0, [0, 2, 3]], "vision")  # [3, h], k nonzeros each
    torch.testing.assert_close(pooled[0], dense.max(0).values)
    assert int((pooled[0] > 0).sum()) > 4  # more than one position's k concepts
    assert torch.equal(pooled[1], torch.zeros(64))  # a row with no masked position


@pytest.fixture(scope="module")
def max_space(model):
    space = random_space(model, layer=SITE, n_concepts=64, k=4)
    space.word_readout = word_readout(64)
    space.word_readout.pool = "max"
    return space


def test_max_pooled_readout_reads_every_image_positions_code(model, max_space, batch, tmp_path):
    max_space.save_pretrained(tmp_path / "space")
    assert load_space(tmp_path / "space").word_readout.pool == "max"  # kept in the file
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        with attach(model, max_space, mode="evidence", strength=2.0):
            steered = model(**batch).logits
        with attach(model, max_space, mode="evidence", strength=2.0, image_weight=0.0):
            novision = model(**batch).logits
    hidden = out.hidden_states[SITE]
    vision, text = prefill_masks(batch["input_ids"], batch["attention_mask"],
                                 torch.tensor([IMAGE_TOKEN]))
    readout = max_space.word_readout
    for row in range(2):
        with torch.no_grad():
            image_code = max_space.encode(hidden[row][vision[row]], "vision").max(0).values
            text_code = max_space.encode(hidden[row][text[row]], "text").max(0).values
        for logits, code in ((steered, image_code), (novision, text_code)):
            evidence = readout.log_ratio_dense(code[None]).clamp(max=0)[0]
            delta = logits[row] - out.logits[row]
            torch.testing.assert_close(delta[text[row]][:, WORD_TOKENS],
                                       (2.0 * evidence).expand(int(text[row].sum()), -1),
                                       atol=1e-5, rtol=1e-5)
        mean_code = max_space.encode(hidden[row][vision[row]].mean(0, keepdim=True), "vision")
        assert not torch.allclose(readout.log_ratio_dense(mean_code),
                                  readout.log_ratio_dense(image_code[None]))
    with pytest.raises(ValueError, match="pool must be one of"):
        WordReadout(torch.zeros(4, 1), torch.zeros(1), torch.tensor([5]), torch.zeros(1),
                    pool="sum")


def test_max_pooled_readout_steers_generate_with_cache_like_without(model, max_space, batch):
    """The running max over the generated tokens' text codes (novision control), and the
    image's evidence kept from prefill (beta 1), give the same logits as recomputing them from
    the whole sequence each step."""
    def run(use_cache, **options):
        with attach(model, max_space, mode="evidence", **options):
            return model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=use_cache,
                                  return_dict_in_generate=True, output_logits=True).logits
    plain = model.generate(**batch, max_new_tokens=5, do_sample=False,
                           return_dict_in_generate=True, output_logits=True).logits
    for beta in (0.0, 1.0):  # beta 1: the image's log ratio is read once, at prefill
        cached = run(True, strength=3.0, image_weight=beta)
        uncached = run(False, strength=3.0, image_weight=beta)
        for a, b, p in zip(cached, uncached, plain):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
            assert (a[:, WORD_TOKENS] - p[:, WORD_TOKENS]).abs().max() > 1e-2  # steered each step
