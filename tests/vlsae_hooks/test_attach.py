"""The front door: generate under every decoding mode, exact revert, batching, 4-bit, errors."""

import copy
import pickle
import warnings

import pytest
import torch
from helpers.spaces import lexvla_space
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

import vlsae_hooks
from vlsae_hooks import ContrastOptions, LexicalOptions, ShiftOptions, attach, register_space
from vlsae_hooks.attach import space_steering
from vlsae_hooks.testing import EOS, left_pad, options_of, random_space, tiny_llava

torch.set_num_threads(1)
# the steered logits alone decide
STRONG = dict(alpha=3.0, image_weight=1.0, contrast_weight=1.0, plausibility_cutoff=0.0)


def generate(model, batch, seed=0, **kw):
    torch.manual_seed(seed)
    return model.generate(**batch, max_new_tokens=6, **kw)[:, -6:]


DECODING = {"greedy": dict(do_sample=False), "sampling": dict(do_sample=True, top_k=0),
            "beam": dict(do_sample=False, num_beams=3)}


@pytest.mark.parametrize("mode", ["contrast", "shift"])
@pytest.mark.parametrize("decoding", sorted(DECODING))
def test_steering_changes_every_decoding_mode(model, space, batch, mode, decoding):
    plain = generate(model, batch, **DECODING[decoding])
    with attach(model, space, mode=mode, **options_of(mode, STRONG)):
        steered = generate(model, batch, **DECODING[decoding])
    assert not torch.equal(plain, steered)
    assert torch.equal(generate(model, batch, **DECODING[decoding]), plain)


@pytest.mark.parametrize("mode", ["contrast", "shift"])
def test_beam_search_scores_replay_exactly(model, space, batch, mode):
    """Each returned beam, re-run token by token from a fresh cache, gets exactly the score
    beam search gave it: the steered cache and the running mean followed every reorder."""
    n_prompt = batch["input_ids"].shape[1]
    with attach(model, space, mode=mode,
                **options_of(mode, dict(alpha=2.0, plausibility_cutoff=0.5))):
        out = model.generate(**batch, max_new_tokens=5, num_beams=3, num_return_sequences=3,
                             length_penalty=0.0, do_sample=False, return_dict_in_generate=True,
                             output_scores=True)
        for r, sequence in enumerate(out.sequences):
            row = r // 3
            mask = batch["attention_mask"][row:row + 1]
            cache = DynamicCache(config=model.config)
            logits = model(input_ids=sequence[None, :n_prompt], attention_mask=mask, cache=cache,
                           pixel_values=batch["pixel_values"][row:row + 1]).logits[0, -1]
            total = 0.0
            for token in sequence[n_prompt:]:
                total += torch.log_softmax(logits.float(), -1)[token].item()
                if token == EOS:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                logits = model(input_ids=token.view(1, 1), attention_mask=mask,
                               cache=cache).logits[0, -1]
            assert total == pytest.approx(out.sequences_scores[r].item(), abs=1e-4)


@pytest.mark.parametrize("mode", ["contrast", "shift"])
def test_batched_equals_per_sample(model, space, rows, pixels, mode):
    kw = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with attach(model, space, mode=mode, alpha=2.0):
        together = model.generate(**left_pad(rows), pixel_values=pixels, **kw)
        for i, row in enumerate(rows):
            alone = model.generate(**left_pad([row]), pixel_values=pixels[i:i + 1], **kw)
            assert torch.equal(together.sequences[i, -5:], alone.sequences[0, -5:])
            for step_together, step_alone in zip(together.logits, alone.logits):
                finite = torch.isfinite(step_alone[0])
                assert torch.equal(finite, torch.isfinite(step_together[i]))
                torch.testing.assert_close(step_together[i][finite], step_alone[0][finite],
                                           atol=1e-4, rtol=0)
    assert mode != "contrast" or not finite.all()  # the plausibility cut really cut


def test_exact_revert_after_remove_context_and_exception(model, space, batch):
    plain = model(**batch).logits
    handle = attach(model, space)
    assert not torch.equal(model(**batch).logits, plain)
    handle.remove()
    handle.remove()  # idempotent
    assert torch.equal(model(**batch).logits, plain)

    with attach(model, space, mode="shift"):
        model.generate(**batch, max_new_tokens=2)
    assert torch.equal(model(**batch).logits, plain)

    class Boom(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), attach(model, space):
        model.generate(**batch, max_new_tokens=4, stopping_criteria=StoppingCriteriaList([Boom()]))
    assert torch.equal(model(**batch).logits, plain)
    with attach(model, space):  # attaching again works after every kind of exit
        model.generate(**batch, max_new_tokens=2)
    assert torch.equal(model(**batch).logits, plain)


def test_attach_twice_is_refused(model, space):
    with attach(model, space):
        with pytest.raises(RuntimeError, match="already attached"):
            attach(model, space)


def test_an_attached_model_is_not_copied_or_pickled_but_says_why(model, space):
    with attach(model, space):
        for copy_it in (copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="steering attached cannot be copied or pickled"):
                copy_it(model)
    assert type(copy.deepcopy(model)) is type(model)  # removed: an ordinary model again


def test_unsupported_model_names_supported_families(model, tiny_clip_model):
    with pytest.raises(ValueError, match=r"does not support CLIPModel.*LLaVA-1.5.*LLaVA-NeXT"
                                         r".*Qwen2.5-VL.*vlsae_hooks.clip"):
        attach(tiny_clip_model, random_space(model))


def test_space_for_another_model(model, space):
    wide = tiny_llava(d=128)
    with pytest.raises(ValueError, match="encodes 64-wide states but the model's decoder "
                                         "layers are 128 wide"):
        attach(wide, space)
    other = random_space(model)
    other.config.model_type = "qwen2_5_vl"
    with pytest.warns(UserWarning, match="trained for a 'qwen2_5_vl' model"):
        attach(model, other).remove()
    other.config.model_type, other.config.model_name = "llava", "org/another-llava"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attach(model, other).remove()  # a model built from a config has no name to compare
    model.config._name_or_path = "org/my-llava"
    try:
        with pytest.warns(UserWarning, match="trained for 'org/another-llava'"):
            attach(model, other).remove()
    finally:
        model.config._name_or_path = ""


def test_site_defaults_and_mismatch(model, space):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = attach(model, space)
    assert handle.site_layer == 2  # the space's own training site
    handle.remove()
    with pytest.warns(UserWarning, match="input of decoder layer 3, but the space was trained "
                                         "at the input of layer 2"):
        assert attach(model, space, layer=2).site_layer == 3  # output of layer 2
    model._vlsae_steering_handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attach(model, space, layer=-2, site="input").site_layer == 2
    model._vlsae_steering_handle.remove()
    reference = random_space(model, layer=2)
    reference.config.source = "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with attach(model, reference) as handle:  # the reference steers one layer later
            assert handle.site_layer == 3
    with pytest.raises(ValueError, match="cannot steer the output of the last decoder layer"):
        attach(model, space, layer=3)
    with pytest.raises(ValueError, match="out of range"):
        attach(model, space, layer=7, site="input")


def test_option_errors(model, space):
    with pytest.raises(TypeError, match="unknown steering options \\['gamma'\\]"):
        attach(model, space, gamma=1)
    with pytest.raises(ValueError, match="mode must be one of"):
        attach(model, space, mode="vcd")
    with pytest.raises(ValueError, match="plausibility_cutoff must lie in"):
        ContrastOptions(plausibility_cutoff=1.5)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        ShiftOptions(alpha=float("nan"))
    with pytest.raises(TypeError, match="space must be a ConceptSpace, a path or None"):
        attach(model, 3)


def test_non_finite_activations_raise_clear_error(model, space, batch):
    poison = model.model.language_model.layers[1].register_forward_hook(
        lambda m, a, out: out * float("nan"))
    try:
        with attach(model, space), pytest.raises(FloatingPointError, match="non-finite"):
            model.generate(**batch, max_new_tokens=2)
    finally:
        poison.remove()


def test_inputs_embeds_only_is_refused(model, space, batch):
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with attach(model, space), pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])


def test_cache_filled_before_attach_is_refused(model, space, batch):
    cache = DynamicCache(config=model.config)
    model(**batch, cache=cache)
    with attach(model, space), pytest.raises(ValueError, match="attach before the prompt"):
        model(input_ids=batch["input_ids"][:, :1], cache=cache)


@pytest.mark.filterwarnings("ignore:the concept space was trained for")
def test_space_from_path_registry_and_model_folder(model, space, batch, tmp_path):
    space.save_pretrained(tmp_path / "space")
    with attach(model, tmp_path / "space", mode="shift") as handle:
        by_path = model(**batch).logits
        assert handle.space.config == space.config
    with attach(model, str(tmp_path / "space"), mode="shift"):  # a path as a string too
        assert torch.equal(model(**batch).logits, by_path)
    with pytest.raises(ValueError, match="no concept space is registered for .* and its "
                                         "directory has no 'vlsae_space/' folder.*register_space"):
        attach(model)
    model.config._name_or_path = str(tmp_path / "toy")
    try:
        register_space(str(tmp_path / "toy"), tmp_path / "space")
        with attach(model, mode="shift"):
            assert torch.equal(model(**batch).logits, by_path)
    finally:
        model.config._name_or_path = ""


def test_public_api():
    assert {"attach", "load_space", "SteeringHandle", "ContrastOptions", "ConceptSpace",
            "SpaceConfig", "VLSAE", "AuxAligner", "VLSAESpace", "register_space",
            "find_space"} <= set(vlsae_hooks.__all__)


@pytest.mark.filterwarnings("ignore:the concept space was trained for")
def test_four_bit_model(space, batch, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    tiny_llava().save_pretrained(tmp_path)
    try:
        quantised = LlavaForConditionalGeneration.from_pretrained(
            tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cpu")
        quantised.generation_config.pad_token_id = 0
        with torch.no_grad():  # bitsandbytes' CPU kernel cannot run with autograd on
            plain = quantised(**batch).logits
    except Exception as err:  # no usable bitsandbytes backend on this machine
        pytest.skip(f"bitsandbytes 4-bit cannot run here: {err}")
    layer = quantised.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    for mode in ("contrast", "shift"):
        with attach(quantised, space, mode=mode, **options_of(mode, STRONG)):
            steered = quantised.generate(**batch, max_new_tokens=4, do_sample=False)
        assert not torch.equal(steered, quantised.generate(**batch, max_new_tokens=4,
                                                           do_sample=False))
    with torch.no_grad():
        assert torch.equal(quantised(**batch).logits, plain)


def test_tuple_outputs_get_the_combined_logits_too(model, space, batch):
    with attach(model, space, plausibility_cutoff=0.5):
        as_dict = model(**batch).logits
        as_tuple = model(**batch, return_dict=False)[0]
    assert torch.equal(as_dict, as_tuple) and torch.isinf(as_dict[:, -1]).any()


def test_wrong_image_control_uses_the_next_rows_image(model, space, rows, pixels):
    same = {**left_pad([rows[0], rows[0]]), "pixel_values": pixels[:1].repeat(2, 1, 1, 1)}
    mixed = {**left_pad([rows[0], rows[0]]), "pixel_values": pixels}
    with torch.no_grad():
        with attach(model, space, mode="shift", **options_of("shift", STRONG)):
            own_same, own_mixed = model(**same).logits, model(**mixed).logits
        with attach(model, space, mode="shift", image_source="other",
                    **options_of("shift", STRONG)):
            other_mixed = model(**mixed).logits
            for one_image in (same, {k: v[:1] for k, v in mixed.items()}):  # no other image
                with pytest.raises(ValueError, match="at least two different images"):
                    model(**one_image)
    # row 0 keeps its own image in the plain path but is steered by row 1's concepts
    assert not torch.allclose(other_mixed[0], own_mixed[0])
    assert torch.equal(own_same[0], own_same[1])
    # rows of one prompt, as beam search expands them: each steered by the other prompt's image
    beams = {**left_pad([rows[0], rows[0], rows[1], rows[1]]),
             "pixel_values": pixels.repeat_interleave(2, 0)}
    prompts = {**left_pad([rows[0], rows[1]]), "pixel_values": pixels}
    with torch.no_grad(), attach(model, space, mode="shift", image_source="other",
                                 **options_of("shift", STRONG)):
        by_beam, by_prompt = model(**beams).logits, model(**prompts).logits
    torch.testing.assert_close(by_beam[::2], by_prompt, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="image_source must be one of"):
        ShiftOptions(image_source="nobody")


def test_a_lexvla_space_recommending_options_but_no_mode_steers_lexically(model):
    lexical = lexvla_space([10, 20, 30])
    lexical.recommended_steering = {"strength": 2.0}
    assert space_steering(lexical) == {"strength": 2.0}
    with attach(model, lexical) as handle:
        assert handle.mode == "lexical" and handle.options == LexicalOptions(strength=2.0)
