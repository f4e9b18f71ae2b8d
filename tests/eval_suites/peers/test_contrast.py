"""VCD and DoLa-style peers: their formulas on hand-made numbers, the cached hook versions against
step-by-step uncached references, and that removing them restores the model exactly."""

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from helpers.toy_llava import toy_inputs

from eval_suites.peers.dola import (
    LayerContrast,
    candidate_layers,
    layer_contrast_logits,
    relative_top_filter,
)
from eval_suites.peers.vcd import VisualContrast, alpha_bar, contrast_logits, diffusion_noise
from vlsae_hooks.testing import tiny_llava

PROMPTS = ["Describe the image.", "Is there a red star in the image?", "What is in the image?"]


@pytest.fixture(scope="module")
def toy(toy_llava):
    torch.set_num_threads(1)
    model, processor = toy_llava
    return model, processor, toy_inputs(processor, PROMPTS)


def reference_greedy(model, inputs, steps: int, next_logits) -> torch.Tensor:
    """Greedy decoding with a full uncached forward per step; ``next_logits(forward_kwargs)`` ->
    [B, V]."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        step = next_logits({"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                            "use_cache": False})
        ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


# --- VCD -----------------------------------------------------------------------------------------

def test_noise_schedule_is_vcds_sigmoid_schedule():
    betas = [1 / (1 + math.exp(-(-6 + 12 * t / 999))) * (0.5e-2 - 1e-5) + 1e-5 for t in range(1000)]
    assert alpha_bar(0) == pytest.approx(1 - betas[0], rel=1e-6)
    assert alpha_bar(500) == pytest.approx(math.prod(1 - b for b in betas[:501]), rel=1e-4)
    assert alpha_bar(999) < alpha_bar(500) < alpha_bar(0)
    with pytest.raises(ValueError):
        alpha_bar(1000)


def test_diffusion_noise_mixes_image_and_gaussian():
    x = torch.linspace(-1, 1, 24).reshape(1, 2, 3, 4)
    noised = diffusion_noise(x, 500, torch.Generator().manual_seed(3))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    a = alpha_bar(500)
    assert torch.allclose(noised, math.sqrt(a) * x + math.sqrt(1 - a) * eps)


def test_contrast_logits_by_hand():
    logits, noised = torch.tensor([[2.0, 1.0, -5.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    # cutoff ln(0.1) + 2 = -0.30 drops the third token; (1 + 1) l - l_noised on the others
    assert contrast_logits(logits, noised, alpha=1.0, beta=0.1).tolist() == [[3.0, 1.0, -math.inf]]
    # cutoff -7.2
    assert contrast_logits(logits, noised, alpha=0.0, beta=1e-4).tolist() == [[2.0, 1.0, -5.0]]


def test_vcd_cached_hooks_match_an_uncached_reference(toy):
    model, _, inputs = toy
    torch.manual_seed(7)
    with VisualContrast(model):
        got = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    torch.manual_seed(7)
    noised = diffusion_noise(inputs["pixel_values"], 500)

    def next_logits(kwargs):
        plain = model(**kwargs, pixel_values=inputs["pixel_values"]).logits[:, -1]
        return contrast_logits(plain, model(**kwargs, pixel_values=noised).logits[:, -1])

    with torch.no_grad():
        want = reference_greedy(model, inputs, 4, next_logits)
    assert torch.equal(got, want)


def test_vcd_with_alpha_zero_is_greedy_and_removal_restores_the_model(toy):
    model, _, inputs = toy
    plain = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    with VisualContrast(model, alpha=0.0):
        assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), plain)
    with VisualContrast(model):
        torch.manual_seed(0)
        sampled = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_p=0.9)
    assert sampled.shape == plain.shape
    assert not model._forward_hooks and not model.model.vision_tower._forward_pre_hooks
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), plain)


def test_vcd_beam_scores_replay_an_uncached_reference(toy):
    """Every returned beam's score equals the sum of VCD's log-probabilities along it, recomputed
    with full uncached forwards: the noised branch's cache followed every beam reorder."""
    model, _, inputs = toy
    torch.manual_seed(3)
    with VisualContrast(model):
        out = model.generate(**inputs, max_new_tokens=4, num_beams=3, num_return_sequences=3,
                             do_sample=False, length_penalty=0.0, return_dict_in_generate=True,
                             output_scores=True)
    torch.manual_seed(3)
    noised = diffusion_noise(inputs["pixel_values"], 500)
    n_prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        for r, sequence in enumerate(out.sequences):
            row = r // 3
            ids, mask = sequence[None, :n_prompt], inputs["attention_mask"][row:row + 1]
            total = 0.0
            for token in sequence[n_prompt:]:
                positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
                kw = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                      "use_cache": False}
                plain = model(**kw, pixel_values=inputs["pixel_values"][row:row + 1]).logits[:, -1]
                distorted = model(**kw, pixel_values=noised[row:row + 1]).logits[:, -1]
                total += torch.log_softmax(contrast_logits(plain, distorted), -1)[0, token].item()
                ids = torch.cat([ids, token.view(1, 1)], dim=1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            assert total == pytest.approx(out.sequences_scores[r].item(), abs=1e-4)


# --- DoLa ----------------------------------------------------------------------------------------

def test_candidate_layers_follow_the_dola_buckets():
    assert candidate_layers(32, "high") == list(range(16, 32, 2))
    assert candidate_layers(32, "low") == list(range(0, 16, 2))
    assert candidate_layers(32, "low", tied_embeddings=True) == list(range(2, 16, 2))
    assert candidate_layers(48, "low") == list(range(0, 20, 2))
    assert candidate_layers(48, "high") == list(range(28, 48, 2))
    assert candidate_layers(4, "high", tied_embeddings=True) == [2]
    assert candidate_layers(4, [3, 1]) == [1, 3]
    with pytest.raises(ValueError):
        candidate_layers(4, "low", tied_embeddings=True)
    with pytest.raises(ValueError):
        candidate_layers(4, [4])


def test_relative_top_filter_by_hand():
    final = torch.log(torch.tensor([[0.6, 0.35, 0.05]]))
    base = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
    kept_final, kept_base = relative_top_filter(final, base, 0.1)  # 0.05 < 0.1 * 0.6: dropped
    assert kept_final[0, 2] == -math.inf and kept_base[0, 2] == pytest.approx(-1e-3)
    assert (torch.equal(kept_final[0, :2], final[0, :2])
            and torch.equal(kept_base[0, :2], base[0, :2]))


def test_premature_layer_is_chosen_per_row():
    final = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    close_to_row0, close_to_row1 = final[[0, 0]] * 0.9, final[[1, 1]] * 0.9
    early = torch.stack([close_to_row0, close_to_row1])  # [L=2, B=2, V]
    got = layer_contrast_logits(final, early)
    # each row contrasts with the candidate FARTHEST from it (largest JSD)
    for row, far in ((0, close_to_row1), (1, close_to_row0)):
        want = layer_contrast_logits(final[row : row + 1], far[row : row + 1][None])
        assert torch.equal(got[row : row + 1], want)


def test_dola_hooks_match_an_uncached_reference(toy):
    model, _, inputs = toy
    with LayerContrast(model, layers=[1, 2]) as dola:
        assert dola.layers == [1, 2]
        got = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    norm, head = model.model.language_model.norm, model.lm_head

    def next_logits(kwargs):
        out = model(**kwargs, pixel_values=inputs["pixel_values"], output_hidden_states=True)
        early = torch.stack([head(norm(out.hidden_states[i][:, -1])) for i in (1, 2)])
        return layer_contrast_logits(out.logits[:, -1], early)

    with torch.no_grad():
        want = reference_greedy(model, inputs, 4, next_logits)
    assert torch.equal(got, want)
    assert not model._forward_hooks


def test_dola_follows_beam_search_and_sampling(toy):
    model, _, inputs = toy
    with LayerContrast(model):
        beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
        torch.manual_seed(0)
        sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True)
    assert beams.shape == sampled.shape == (len(PROMPTS), inputs["input_ids"].shape[1] + 3)


def test_peers_are_toy_world_methods():
    from eval_suites.toyworld.methods import toy_methods

    assert {"greedy", "vcd", "dola"} <= set(toy_methods())


def test_vcd_plausibility_cutoff_reads_the_plain_distribution_only():
    logits, noised = torch.tensor([[2.0, 1.0, -5.0]]), torch.tensor([[5.0, -3.0, 0.0]])
    assert contrast_logits(logits, noised, alpha=1.0, beta=0.1).tolist() == [
        [-1.0, 5.0, -math.inf]]


def test_diffusion_noise_draws_its_own_noise_for_each_image():
    x = torch.full((2, 3, 4, 4), 0.5)
    noised = diffusion_noise(x, 500, torch.Generator().manual_seed(3))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    a = alpha_bar(500)
    assert torch.allclose(noised, math.sqrt(a) * x + math.sqrt(1 - a) * eps)
    assert not torch.allclose(noised[0], noised[1])


def test_vcd_hook_uses_its_own_alpha_beta_and_noise_step(toy):
    model, _, inputs = toy
    torch.manual_seed(11)
    with VisualContrast(model, alpha=0.5, beta=0.2, noise_step=999):
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    torch.manual_seed(11)
    noised = diffusion_noise(inputs["pixel_values"], 999)
    with torch.no_grad():
        plain = model(**inputs).logits[:, -1]
        distorted = model(**{**inputs, "pixel_values": noised}).logits[:, -1]
    want, got = contrast_logits(plain, distorted, alpha=0.5, beta=0.2), out.logits[0]
    kept = ~torch.isinf(want)
    assert torch.equal(torch.isinf(got), ~kept)
    assert torch.allclose(got[kept], want[kept], atol=1e-4)


def test_dola_scores_by_hand_with_the_papers_jensen_shannon_choice():
    """Jensen-Shannon picks the second candidate; KL(final || early), and the DoLa code's
    KL(M || P) + KL(M || Q), would pick the first."""
    final = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    early = torch.log(torch.tensor([[[0.01, 0.1, 0.89]], [[0.05, 0.01, 0.94]]]))
    want = final - torch.log(torch.tensor([[0.05, 0.01, 0.94]]))
    assert torch.allclose(layer_contrast_logits(final, early, 0.1), want, atol=1e-5)


def test_dola_prefill_logits_use_the_last_position_of_each_padded_row(toy):
    model, _, inputs = toy
    assert not bool(inputs["attention_mask"][:, 0].all())  # left padding
    with LayerContrast(model, layers=[1, 2], relative_top=0.3), torch.no_grad():
        got = model(**inputs).logits[:, -1]
    norm, head = model.model.language_model.norm, model.lm_head
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        early = torch.stack([head(norm(out.hidden_states[i][:, -1])) for i in (1, 2)])
        want = layer_contrast_logits(out.logits[:, -1], early, 0.3)
        default = layer_contrast_logits(out.logits[:, -1], early, 0.1)
    assert not torch.equal(torch.isinf(want), torch.isinf(default))  # relative_top matters
    kept = ~torch.isinf(want)
    assert torch.equal(torch.isinf(got), ~kept)
    assert torch.allclose(got[kept], want[kept], atol=1e-5)


def test_dola_low_bucket_skips_tied_embeddings():
    model = tiny_llava()
    with LayerContrast(model, layers="low") as dola:
        assert dola.layers == [0]
    model.config.text_config.tie_word_embeddings = True
    with pytest.raises(ValueError, match="no 'low' DoLa layers"):
        LayerContrast(model, layers="low")


def test_registered_peers_use_their_documented_settings(monkeypatch):
    from eval_suites.core.methods import get_method
    from eval_suites.peers import methods as peer_methods

    seen = {}

    def spy(name):
        @contextlib.contextmanager
        def peer(model, **kwargs):
            seen[name] = kwargs
            yield

        return peer

    for name in ("VisualContrast", "LayerContrast", "VisualSteering"):
        monkeypatch.setattr(peer_methods, name, spy(name))
    processor, decoders = SimpleNamespace(tokenizer=SimpleNamespace()), {}
    for method in ("vcd", "dola", "vista", "vista-wrongimage"):
        with get_method(method)(object(), processor) as decoder:
            decoders[method] = decoder.kwargs
            if method.startswith("vista"):
                seen[method] = seen.pop("VisualSteering")
    assert seen["VisualContrast"] == {"alpha": 1.0, "beta": 0.1, "noise_step": 500}
    assert seen["LayerContrast"] == {"layers": "high", "relative_top": 0.1}
    assert seen["vista"] == {"lam": 0.1, "image_source": "own"}
    assert seen["vista-wrongimage"] == {"lam": 0.1, "image_source": "other"}
    assert all(kwargs == {"do_sample": False} for kwargs in decoders.values())


def test_relative_top_one_keeps_exactly_the_most_probable_token():
    final = torch.log(torch.tensor([[0.6, 0.35, 0.05]]))
    kept, _ = relative_top_filter(final, final, 1.0)  # the cutoff is the max itself
    assert kept[0, 0] == final[0, 0] and kept[0, 1:].tolist() == [-math.inf, -math.inf]
    with LayerContrast(tiny_llava(), layers=[0], relative_top=1.0) as dola:
        assert dola.relative_top == 1.0


def test_vcd_refuses_fewer_images_than_prompts(tiny_llava_model):
    from vlsae_hooks.testing import left_pad, llava_prompt

    batch = left_pad([llava_prompt([5, 6]), llava_prompt([7], n_image_tokens=0),
                      llava_prompt([8, 9])])  # 3 prompts, 2 images: the model itself accepts it
    batch["pixel_values"] = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with VisualContrast(tiny_llava_model), pytest.raises(ValueError, match="2 images for 3"):
        tiny_llava_model.generate(**batch, max_new_tokens=1, do_sample=False)
