"""Steering maths and the cached state, checked against hand computation on a tiny LLaVA."""

import math
from types import SimpleNamespace

import pytest
import torch
from helpers.spaces import small_space
from transformers import DynamicCache

from vlsae_hooks import VLSAESpace, attach
from vlsae_hooks.cache_state import SteeringState
from vlsae_hooks.modes.contrast import ContrastSteerer
from vlsae_hooks.pooling import prefill_masks
from vlsae_hooks.realignment import Realigner, contrast_logits, realign_delta
from vlsae_hooks.testing import IMAGE_TOKEN, tiny_llava

torch.set_num_threads(1)
SITE = 2  # the random space says: input of decoder layer 2
IMAGE_IDS = torch.tensor([IMAGE_TOKEN])


def record_site(model, store: list):
    """Record the input of the steering layer (registered before attach: unshifted;
    after attach: what the layer really receives)."""
    return model.model.language_model.layers[SITE].register_forward_pre_hook(
        lambda module, args: store.append(args[0].detach().clone()))


def expected_shift(space, hidden, vision, text, alpha, image_weight):
    """The reference formulas with dense codes, one row at a time."""
    beta = image_weight
    out = hidden.clone()
    for row in range(hidden.shape[0]):
        v, t = hidden[row][vision[row]].mean(0), hidden[row][text[row]].mean(0)
        z = (1 - beta) * space.encode(t, "text") + beta * space.encode(v, "vision")
        t_new = (1 - alpha) * t + alpha * space.decode(z, "text")
        out[row][text[row]] += t_new - t
    return out


def test_prefill_masks_skip_padding_and_pre_image_tokens():
    ids = torch.tensor([[0, 0, 1, 3, IMAGE_TOKEN, IMAGE_TOKEN, 9, 10], [1, 3, 5, 6, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    vision, text = prefill_masks(ids, mask, IMAGE_IDS)
    assert vision.tolist() == [[0, 0, 0, 0, 1, 1, 0, 0], [0] * 8]
    assert text.tolist() == [[0, 0, 0, 0, 0, 0, 1, 1], [0] * 8]  # no image -> not steered


def test_realign_delta_matches_dense_formula(space):
    torch.manual_seed(0)
    v, t = torch.randn(3, 64), torch.randn(3, 64)
    values, indices = space.encode_sparse(v, "vision")
    delta = realign_delta(space, values, indices, t, alpha=0.3, image_weight=0.6)
    z = 0.4 * space.encode(t, "text") + 0.6 * space.encode(v, "vision")
    torch.testing.assert_close(delta, 0.3 * (space.decode(z, "text") - t), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("has_aligner", [True, False])
@pytest.mark.parametrize("image_weight", [0.0, 0.6, 1.0])
def test_the_fused_realigner_equals_realign_delta(has_aligner, image_weight):
    """The image's part decoded once plus the text's part per step = the whole mixed code
    through the space's modules (same values up to float rounding)."""
    space = small_space(has_aligner=has_aligner)
    generator = torch.Generator().manual_seed(1)
    v, t = torch.randn(3, 8, generator=generator), torch.randn(3, 8, generator=generator)
    values, indices = space.encode_sparse(v, "vision")
    realigner = Realigner(space, 0.3, image_weight)
    term = realigner.image_term(values, indices)
    expected = realign_delta(space, values, indices, t, 0.3, image_weight)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(realigner.delta(values, indices, term, t), expected,
                               atol=1e-6, rtol=1e-5)


class UnfusedSpace(VLSAESpace):
    """The same space with no fused text decoder: realignment through encode / decode."""

    def fused_text_decoder(self):
        return None


@pytest.mark.parametrize("mode", ["shift", "contrast"])
def test_a_space_without_a_fused_path_steers_the_same(model, space, batch, mode):
    unfused = UnfusedSpace(space.sae, space.aligner, space.config)
    assert Realigner(unfused, 1.0, 0.5).image_term(*space.encode_sparse(torch.ones(1, 64),
                                                                         "vision")) is None
    runs = []
    for concept_space in (space, unfused):
        with torch.no_grad(), attach(model, concept_space, mode=mode, alpha=1.0,
                                     image_weight=0.5):
            out = model.generate(**batch, max_new_tokens=4, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        runs.append(out)
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(torch.stack(runs[0].scores), torch.stack(runs[1].scores),
                               atol=1e-4, rtol=1e-4)


def test_contrast_logits_by_hand():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    plain, steered = probs.log(), torch.tensor([1.0, 2.0, 3.0, 4.0])
    # keeps p >= 0.25: tokens 0 and 1
    out = contrast_logits(plain, steered, contrast_weight=0.25, plausibility_cutoff=0.5)
    expected = torch.tensor([0.75 * math.log(0.5) + 0.25, 0.75 * math.log(0.3) + 0.5,
                             -math.inf, -math.inf])
    torch.testing.assert_close(out, expected)
    none_survive = contrast_logits(plain, steered, contrast_weight=0.25, plausibility_cutoff=2.0)
    assert torch.equal(none_survive, plain)
    assert torch.equal(contrast_logits(plain, steered, contrast_weight=0.0,
                                       plausibility_cutoff=0.0), plain)


def test_shift_matches_hand_computation(model, space, batch):
    before, after = [], []
    recorder = record_site(model, before)
    with attach(model, space, mode="shift", alpha=0.5, image_weight=0.7):
        seen = record_site(model, after)
        model(**batch, use_cache=False)
        seen.remove()
    recorder.remove()
    vision, text = prefill_masks(batch["input_ids"], batch["attention_mask"], IMAGE_IDS)
    expected = expected_shift(space, before[0], vision, text, alpha=0.5, image_weight=0.7)
    torch.testing.assert_close(after[0], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(after[0][~text], before[0][~text])  # image, padding, pre-image untouched
    assert not torch.allclose(after[0][text], before[0][text])


def test_cached_decode_step_uses_running_text_mean(model, space, batch):
    """One decode step: the new position is shifted with the mean over prompt text + itself."""
    before, after = [], []
    recorder = record_site(model, before)
    with attach(model, space, mode="shift", alpha=0.5, image_weight=0.7):
        seen = record_site(model, after)
        model.generate(**batch, max_new_tokens=2, do_sample=False)
        seen.remove()
    recorder.remove()
    vision, text = prefill_masks(batch["input_ids"], batch["attention_mask"], IMAGE_IDS)
    prefill, step = before[0], before[1]
    for row in range(2):
        v = prefill[row][vision[row]].mean(0)
        t = torch.cat([prefill[row][text[row]], step[row]]).mean(0)
        z = 0.3 * space.encode(t, "text") + 0.7 * space.encode(v, "vision")
        shift = 0.5 * (space.decode(z, "text") - t)
        torch.testing.assert_close(after[1][row, 0], step[row, 0] + shift, atol=1e-5, rtol=1e-5)


def test_cache_on_equals_cache_off_for_the_first_step(model, space, batch):
    kw = dict(max_new_tokens=1, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with attach(model, space, mode="shift", alpha=1.5):
        cached = model.generate(**batch, use_cache=True, **kw).logits[0]
        uncached = model.generate(**batch, use_cache=False, **kw).logits[0]
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)


def test_zero_strength_is_identity(model, space, batch):
    plain = model(**batch).logits
    with attach(model, space, mode="shift", alpha=0.0):
        assert torch.equal(model(**batch).logits, plain)
    with attach(model, space, mode="contrast", alpha=2.0, contrast_weight=0.0,
                plausibility_cutoff=0.0):
        assert torch.equal(model(**batch).logits, plain)


@pytest.mark.parametrize("options", [dict(mode="contrast"),
                                     dict(mode="reference", contrast_weight=0.0)])
def test_contrast_runs_the_upper_layers_once_on_both_branches(model, space, batch, options):
    """Layers from the site (2 here) on run once, on the plain and the steered rows together;
    the logits keep the batch's rows. Reference mode runs its branch even where it weighs 0:
    its cost is the point."""
    rows = [[] for _ in range(4)]
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o, j=j: rows[j].append(len(o)))
             for j, layer in enumerate(model.model.language_model.layers)]
    with attach(model, space, **options):
        logits = model(**batch).logits
    for hook in hooks:
        hook.remove()
    assert rows == [[2], [2], [4], [4]] and len(logits) == 2


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
        got = ContrastSteerer._both_branches(call, dict(
            attention_mask=mask, position_embeddings=(cos, cos), cache_position=torch.arange(5),
            use_cache=True, past_key_values=None))
        assert torch.equal(got["attention_mask"], torch.cat([mask, mask]))
        assert torch.equal(got["position_embeddings"][0], torch.cat([cos, cos]))
        assert got["position_embeddings"][1] is got["position_embeddings"][0]  # doubled once
        assert got["cache_position"].shape == (5,) and got["use_cache"] is True
        again = ContrastSteerer._both_branches(call, dict(attention_mask=mask))
        assert again["attention_mask"] is got["attention_mask"]  # the next layer reuses it
    block_mask = SimpleNamespace(shape=(1, 1, 5, 9))
    call = SimpleNamespace(input_ids=torch.zeros(1, 5, dtype=torch.long), both={})
    assert ContrastSteerer._both_branches(call, dict(attention_mask=block_mask)) == dict(
        attention_mask=block_mask)  # one row: it broadcasts over both
    call = SimpleNamespace(input_ids=torch.zeros(2, 5, dtype=torch.long), both={})
    with pytest.raises(ValueError, match="attention_mask.*attn_implementation='sdpa'"):
        ContrastSteerer._both_branches(call, dict(attention_mask=SimpleNamespace(
            shape=(2, 1, 5, 9))))
