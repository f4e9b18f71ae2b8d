"""Contrast mode's logits, where the other contrast tests do not look: the cutoff alone (weight
0) cuts the text after the image only and reads no text state while decoding, and a call with
``labels`` that keeps only its last logits contrasts them with the steered branch's own last
positions."""

import torch
from transformers import DynamicCache

from vlsae_hooks import attach
from vlsae_hooks.pooling import prefill_masks
from vlsae_hooks.realignment import cutoff_logits
from vlsae_hooks.testing import IMAGE_TOKEN

torch.set_num_threads(1)


@torch.no_grad()
def test_the_cutoff_alone_cuts_only_the_text_after_the_image(model, space, batch):
    """Every position of a prefill: the pre-image tokens, the image and the padding keep the
    plain logits bit for bit; the text after the image gets exactly the cutoff of them."""
    plain = model(**batch).logits
    with attach(model, space, mode="contrast", contrast_weight=0.0, plausibility_cutoff=0.9):
        cut = model(**batch).logits
    _, text = prefill_masks(batch["input_ids"], batch["attention_mask"],
                            torch.tensor([IMAGE_TOKEN]))
    assert torch.equal(cut[~text], plain[~text])
    assert torch.equal(cut[text], cutoff_logits(plain[text], 0.9))
    assert torch.isinf(cut[text]).any()


@torch.no_grad()
def test_the_cutoff_alone_reads_no_text_while_decoding(model, space, batch):
    """With contrast_weight 0 nothing reads the running text mean: a step leaves the state's
    sums as the prefill made them (with a branch they count the step's token)."""
    for weight, added in ((0.0, 0), (0.6, 1)):
        cache = DynamicCache(config=model.config)
        with attach(model, space, mode="contrast", contrast_weight=weight):
            model(**batch, cache=cache)
            state = cache.layers[-1]
            count, total = state.text_count.clone(), state.text_sum.clone()
            mask = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
            model(input_ids=torch.tensor([[11], [21]]), attention_mask=mask, cache=cache)
        assert torch.equal(state.text_count, count + added)
        assert torch.equal(state.text_sum, total) == (added == 0)


@torch.no_grad()
def test_a_call_with_labels_keeping_its_last_logits_contrasts_the_last_positions(model, space,
                                                                                 batch):
    """``logits_to_keep=2`` with labels: the steered branch's final-norm output (all positions)
    is cut to the same last two before its head, so the logits are the last two of a call
    without labels, and the loss is the plain model's."""
    labels = batch["input_ids"][:, -2:]
    plain = model(**batch, labels=labels, logits_to_keep=2)
    with attach(model, space, mode="contrast", contrast_weight=0.6, plausibility_cutoff=0.9):
        full = model(**batch).logits
        kept = model(**batch, labels=labels, logits_to_keep=2)
    assert kept.logits.shape == (2, 2, full.shape[-1])
    torch.testing.assert_close(kept.logits, full[:, -2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kept.loss, plain.loss, atol=1e-5, rtol=1e-5)
    assert torch.isinf(kept.logits).any() and not torch.isinf(plain.logits).any()  # steered
