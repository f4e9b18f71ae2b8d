"""Contrast mode's steered branch, run as extra rows of the batch from the steering site on: which
layers see which rows, the cache layers that hold both branches, the recorded outputs, the inputs a
layer gets doubled, and the logits against shift mode's step by step."""

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from vlsae_hooks import attach
from vlsae_hooks.cache_state import SteeringState
from vlsae_hooks.modes.contrast import ContrastSteerer
from vlsae_hooks.realignment import contrast_logits
from vlsae_hooks.testing import left_pad, llava_prompt, tiny_llava

torch.set_num_threads(1)


@pytest.mark.parametrize("options", [dict(mode="contrast"),
                                     dict(mode="reference", contrast_weight=0.0)])
def test_contrast_runs_the_upper_layers_once_on_both_branches(model, space, batch, options):
    """Layers from the site (2 here) on, and the head, run once, on the plain and the steered
    rows together; the logits keep the batch's rows. Reference mode runs its branch even where
    it weighs 0: its cost is the point."""
    rows = [[] for _ in range(5)]
    modules = [layer.mlp for layer in model.model.language_model.layers] + [model.lm_head]
    hooks = [module.register_forward_hook(lambda m, a, o, j=j: rows[j].append(len(o)))
             for j, module in enumerate(modules)]
    with attach(model, space, **options):
        logits = model(**batch).logits
    for hook in hooks:
        hook.remove()
    assert rows == [[2], [2], [4], [4], [4]] and len(logits) == 2


def test_the_cutoff_alone_runs_no_branch_and_gives_the_branchs_logits(model, space, batch):
    """contrast_weight 0 weighs the branch's logits 0: with none run, every cached step's
    logits are exactly contrast_logits(plain, shift-mode logits, 0, cutoff)."""
    tokens = torch.tensor([[11, 12, 13], [21, 22, 23]])
    plain = stepwise_logits(model, batch, tokens)
    with attach(model, space, mode="shift", alpha=1.5):
        shifted = stepwise_logits(model, batch, tokens)
    calls = [0] * 4
    hooks = [layer.self_attn.register_forward_hook(
        lambda m, a, o, j=j: calls.__setitem__(j, calls[j] + 1))
        for j, layer in enumerate(model.model.language_model.layers)]
    try:
        with attach(model, space, mode="contrast", alpha=1.5, contrast_weight=0.0,
                    plausibility_cutoff=0.9):
            cut = stepwise_logits(model, batch, tokens)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [4, 4, 4, 4]  # the prefill and three steps, each layer once
    for l_plain, l_shift, l_cut in zip(plain, shifted, cut):
        assert torch.equal(l_cut, contrast_logits(l_plain, l_shift, contrast_weight=0.0,
                                                  plausibility_cutoff=0.9))
        assert torch.isinf(l_cut).any() and not torch.equal(l_cut, l_plain)


def test_state_lives_in_the_cache_and_follows_reorder(model, space, batch):
    for mode, twins in (("contrast", 2), ("shift", 0)):
        cache = DynamicCache(config=model.config)
        with attach(model, space, mode=mode):
            model(**batch, cache=cache, use_cache=True)
        assert len(cache.layers) == 4 + 1
        state = cache.layers[-1]
        assert isinstance(state, SteeringState) and not cache.is_croppable
        assert [len(layer.keys) for layer in cache.layers[:4]] == [2] * (4 - twins) + [4] * twins
        text_sum, values = state.text_sum.clone(), state.vision_values.clone()
        keys = cache.layers[3].keys.clone()
        cache.reorder_cache(torch.tensor([1, 1]))
        assert torch.equal(state.text_sum, text_sum[[1, 1]])
        assert torch.equal(state.vision_values, values[[1, 1]])
        # a twin layer's rows are [plain rows; steered rows]: a reorder picks one of each
        assert torch.equal(cache.layers[3].keys, keys[[1, 1, 3, 3] if twins else [1, 1]])
        cache.batch_select_indices(torch.tensor([0]))
        assert state.text_count.shape == (1,)
        assert torch.equal(cache.layers[3].keys, keys[[1, 3] if twins else [1]])
        cache.batch_repeat_interleave(2)
        assert torch.equal(cache.layers[3].keys, keys[[1, 1, 3, 3] if twins else [1, 1]])
        cache.batch_select_indices(torch.tensor([False, True]))  # a boolean selection too
        assert torch.equal(cache.layers[3].keys, keys[[1, 3] if twins else [1]])
        assert torch.equal(state.text_sum, text_sum[[1]])
        state.crop(0)  # nothing to roll back
        with pytest.raises(ValueError, match="cannot roll its state back"):
            state.crop(-1)


def test_a_reset_cache_is_reused_by_either_mode(model, space, batch):
    """A cache reset after a contrast call (upper layers twice as wide) serves a shift call as a
    fresh one would, and the other way round."""
    reused = DynamicCache(config=model.config)
    for mode in ("contrast", "shift", "contrast"):
        with attach(model, space, mode=mode):
            fresh = model(**batch, cache=DynamicCache(config=model.config)).logits
            reused.reset()
            got = model(**batch, cache=reused).logits
        assert torch.equal(got, fresh)
        assert [len(layer.keys) for layer in reused.layers[:4]] == (
            [2, 2, 4, 4] if mode == "contrast" else [2] * 4)
        keys = reused.layers[3].keys.clone()
        reused.reorder_cache(torch.tensor([1, 0]))
        assert torch.equal(reused.layers[3].keys,
                           keys[[1, 0, 3, 2] if mode == "contrast" else [1, 0]])


@pytest.mark.parametrize("return_dict", [True, False])
def test_recorded_outputs_keep_only_the_plain_rows(space, batch, return_dict):
    """Hidden states and attentions of the layers from the site (2) on are recorded on 2B rows
    (both branches); the outputs hold the plain ones only. Below the site they are the plain
    model's bit for bit; from it on to float rounding (a batch of twice the rows)."""
    model = tiny_llava(n_layers=4)
    model.set_attn_implementation("eager")  # sdpa records no attentions
    record = dict(output_hidden_states=True, output_attentions=True, return_dict=return_dict)
    plain = model(**batch, **record)
    with attach(model, space, mode="contrast"):
        out = model(**batch, **record)
    if return_dict:
        hidden, attentions = out.hidden_states, out.attentions
        plain_hidden, plain_attentions = plain.hidden_states, plain.attentions
    else:  # (logits, cache, hidden states, attentions, image features)
        (hidden, attentions), (plain_hidden, plain_attentions) = out[2:4], plain[2:4]
    assert len(hidden) == len(plain_hidden) == 5 and len(attentions) == len(plain_attentions) == 4
    for j, (got, want) in enumerate(zip(hidden, plain_hidden)):  # j: the input of layer j
        assert got.shape == want.shape
        if j <= 2:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got, want in zip(attentions, plain_attentions):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_call_with_labels_keeps_the_plain_loss_and_steers_the_logits(model, space, batch):
    """Without labels the model's head runs once on both branches' rows; with labels the steered
    half is split off before it, so the model's loss is the plain rows' (to the rounding of a
    batch of twice the rows), and the logits are those of the call without labels."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        plain = model(**batch, labels=labels)
        with attach(model, space, mode="contrast"):
            steered = model(**batch)
            labelled = model(**batch, labels=labels)
            loss, logits = model(**batch, labels=labels, return_dict=False)[:2]
    assert steered.logits.shape == plain.logits.shape
    assert torch.isinf(steered.logits).any() and not torch.isinf(plain.logits).any()
    for got in (labelled.loss, loss):
        torch.testing.assert_close(got, plain.loss, atol=1e-5, rtol=1e-5)
    for got in (labelled.logits, logits):
        torch.testing.assert_close(got, steered.logits, atol=1e-5, rtol=1e-5)


def stepwise_logits(model, batch, tokens):
    """Last-position logits of a cached prefill and then one decode step per forced token."""
    cache = DynamicCache(config=model.config)
    mask = batch["attention_mask"]
    out = [model(**batch, cache=cache).logits[:, -1]]
    for token in tokens.T:
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out.append(model(input_ids=token[:, None], attention_mask=mask, cache=cache).logits[:, -1])
    return out


def test_contrast_branch_equals_shift_mode_step_by_step(model, space, batch):
    """With the same tokens forced, contrast logits = contrast_logits(plain, shift-mode logits)
    at every cached step: the branch's own cache holds exactly what shift mode's does."""
    tokens = torch.tensor([[11, 12, 13], [21, 22, 23]])
    plain = stepwise_logits(model, batch, tokens)
    options = dict(alpha=1.5, image_weight=0.8)
    with attach(model, space, mode="shift", **options):
        shifted = stepwise_logits(model, batch, tokens)
    with attach(model, space, mode="contrast", contrast_weight=0.6, plausibility_cutoff=0.3,
                **options):
        contrast = stepwise_logits(model, batch, tokens)
    for l_plain, l_shift, l_contrast in zip(plain, shifted, contrast):
        expected = contrast_logits(l_plain, l_shift, contrast_weight=0.6, plausibility_cutoff=0.3)
        assert torch.equal(torch.isinf(expected), torch.isinf(l_contrast))
        torch.testing.assert_close(l_contrast, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(l_shift, l_plain, atol=1e-3)


def test_a_layers_inputs_are_doubled_for_both_branches():
    """Tensors with the batch's rows come twice (a view for one row), once per call; the cache
    position and other inputs pass as they are; a non-tensor input made for B > 1 rows (flex
    attention's BlockMask) is refused with what to do."""
    for rows in (1, 3):
        call = SimpleNamespace(input_ids=torch.zeros(rows, 5, dtype=torch.long), both={})
        mask, cos = torch.randn(rows, 1, 5, 9), torch.randn(rows, 5, 8)
        got = ContrastSteerer._inputs_for_both(call, dict(
            attention_mask=mask, position_embeddings=(cos, cos), cache_position=torch.arange(5),
            use_cache=True, past_key_values=None))
        assert torch.equal(got["attention_mask"], torch.cat([mask, mask]))
        assert torch.equal(got["position_embeddings"][0], torch.cat([cos, cos]))
        assert got["position_embeddings"][1] is got["position_embeddings"][0]  # doubled once
        assert got["cache_position"].shape == (5,) and got["use_cache"] is True
        step = ContrastSteerer._inputs_for_both(call, dict(cache_position=torch.arange(rows)))
        assert step["cache_position"].shape == (rows,)  # 1-D, however long: not the batch's
        again = ContrastSteerer._inputs_for_both(call, dict(attention_mask=mask))
        assert again["attention_mask"] is got["attention_mask"]  # the next layer reuses it
    block_mask = SimpleNamespace(shape=(1, 1, 5, 9))
    call = SimpleNamespace(input_ids=torch.zeros(1, 5, dtype=torch.long), both={})
    assert ContrastSteerer._inputs_for_both(call, dict(attention_mask=block_mask)) == dict(
        attention_mask=block_mask)  # one row: it broadcasts over both
    call = SimpleNamespace(input_ids=torch.zeros(2, 5, dtype=torch.long), both={})
    with pytest.raises(ValueError, match="attention_mask.*attn_implementation='sdpa'"):
        ContrastSteerer._inputs_for_both(call, dict(attention_mask=SimpleNamespace(
            shape=(2, 1, 5, 9))))


def test_flex_attention_on_one_prompt_steers_as_sdpa_does(space, pixels):
    """Flex attention's ``BlockMask``, made for one row, broadcasts over both branches' rows:
    contrast on one prompt gives the logits it gives under sdpa, at prefill and at each cached
    step (flex attention compiles on first use: about 20 s on two cores).

    Torch's own compiled flex attention is wrong on some CPUs at some lengths (torch 2.14.1 on
    an AVX2 CPU: 8, 24 and 40 keys of 8 to 48, nan or off by up to 1, no hook attached), so the
    prompt's lengths (25 tokens, then 26 and 27) avoid those, and the unsteered model's logits
    are checked against sdpa's before the steered ones: where flex attention itself disagrees
    with sdpa there is nothing of ours to test, and the test says so."""
    one = {**left_pad([llava_prompt([5, 6, 7, 8, 9, 10, 11])]), "pixel_values": pixels[:1]}
    tokens = torch.tensor([[11, 12]])
    model = tiny_llava(n_layers=4)  # its own: the attention implementation changes
    plain, logits = {}, {}
    for implementation in ("sdpa", "flex_attention"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():  # steered first: torch 2.6 compiles this order, not the other
            with attach(model, space, mode="contrast"):
                logits[implementation] = stepwise_logits(model, one, tokens)
            plain[implementation] = stepwise_logits(model, one, tokens)
    if not all(torch.allclose(got, want, atol=1e-5, rtol=1e-5)
               for got, want in zip(plain["flex_attention"], plain["sdpa"])):
        pytest.skip("torch's flex attention disagrees with sdpa on this machine without "
                    "steering (a torch bug at these lengths): nothing of vlsae's to compare")
    for got, want in zip(logits["flex_attention"], logits["sdpa"]):
        assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.isinf(got).any()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
