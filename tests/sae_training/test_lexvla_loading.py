"""How a LexVLA is loaded and saved: the language model read out of a llava folder (its tied
LM head left out of the file, a missing weight refused), the tokenizer's padding, the VLM's
processor, tokenizer and type recorded when building against a VLM, the text model found beside
the folder or taken as a hub id, a folder trained with another LM refused, and a loaded model
that is in eval mode with its LoRA frozen."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.lexvla import tiny_config
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from sae_training.lexvla.model import (
    LexVLA,
    load_text_model,
    load_tokenizer,
    resolve_beside,
    vlm_pixel_normalisation,
)
from vlsae_hooks.spaces.lexvla import UNMAPPED, drop_below
from vlsae_hooks.testing import tiny_llava


def test_a_llava_folder_with_a_tied_head_loads_and_one_missing_a_weight_is_refused(tmp_path):
    vlm = tiny_llava()
    vlm.config.text_config.tie_word_embeddings = vlm.config.tie_word_embeddings = True
    vlm.tie_weights()
    vlm.save_pretrained(tmp_path / "tied")  # the head is the embeddings: not in the file
    lm = load_text_model(str(tmp_path / "tied"))
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    tiny_llava().save_pretrained(tmp_path / "cut")
    (file,) = (tmp_path / "cut").glob("*.safetensors")
    state = load_file(str(file))
    norm = next(k for k in state if k.endswith("model.norm.weight"))
    del state[norm]
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"do not fit \(missing \['model.norm.weight'\]"):
        load_text_model(str(tmp_path / "cut"))


def test_a_tokenizer_without_pad_pads_left_with_unk_else_eos(tmp_path):
    for unk, pad in (("<unk>", "<unk>"), (None, "</s>")):
        special = ["<s>", "</s>"] + ([unk] if unk else [])
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + ["red"])},
                                         unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                unk_token=unk).save_pretrained(tmp_path / str(unk))
        loaded = load_tokenizer(str(tmp_path / str(unk)))
        assert loaded.pad_token == pad and loaded.padding_side == "left"


def test_building_against_a_vlm_records_its_processor_tokenizer_and_type(text_model_dir,
                                                                         llava_dir):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(llava_dir)
    expected = (list(processor.image_mean), list(processor.image_std))
    assert expected != ([0.5] * 3, [0.5] * 3)
    assert vlm_pixel_normalisation(str(llava_dir), ((0.5,) * 3, (0.5,) * 3)) == expected
    torch.manual_seed(0)
    lex = LexVLA.build(tiny_config(text_model_dir), vlm=str(llava_dir))
    config = lex.space.config
    assert (config.model_name, config.model_type) == (str(llava_dir), "llava")
    assert (config.extra["vlm_pixel_mean"], config.extra["vlm_pixel_std"]) == expected
    assert (config.extra["pixel_mean"], config.extra["pixel_std"]) == ([0.5] * 3, [0.5] * 3)
    assert lex.space.vlm_token_ids.tolist() == [UNMAPPED] * len(lex.words)  # "w0".. only


def test_the_text_model_is_found_beside_the_folder_else_taken_as_given(tmp_path):
    (tmp_path / "llm").mkdir()
    assert resolve_beside(tmp_path, "llm") == str((tmp_path / "llm").resolve())
    assert resolve_beside(tmp_path, "org/some-llm") == "org/some-llm"  # a hub id
    assert resolve_beside(tmp_path / "x", str(tmp_path / "llm")) == str(tmp_path / "llm")


def test_words_and_phrases_must_match_the_spaces_units(model):
    with pytest.raises(ValueError, match="words \\+ phrases do not match"):
        LexVLA(model.config, model.space, model.text_lm, model.tokenizer, model.word_ids[:-1])


def test_a_loaded_model_is_frozen_in_eval_mode_and_refuses_another_text_model(model, tmp_path,
                                                                              text_model_dir):
    model.save_pretrained(tmp_path / "lex")
    assert not (tmp_path / "lex" / "text_lora" / "README.md").exists()
    loaded = LexVLA.from_pretrained(tmp_path / "lex")
    assert not loaded.training and not loaded.text_lm.training
    assert not any(p.requires_grad for p in loaded.text_lm.parameters())
    other = LlamaForCausalLM.from_pretrained(text_model_dir)
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(2)
    other.save_pretrained(tmp_path / "other")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(text_model_dir) / name).exists():
            (tmp_path / "other" / name).write_bytes((Path(text_model_dir) / name).read_bytes())
    model.save_pretrained(tmp_path / "moved", text_model=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="its text codebook is not the LM head of"):
        LexVLA.from_pretrained(tmp_path / "moved")


@torch.no_grad()
def test_sparse_text_vectors_drop_the_entries_below_one_over_sqrt_v(model):
    captions = ["a red star", "a blue ring and a green square"]
    dense, sparse = model.text_vectors(captions), model.text_vectors(captions, sparse=True)
    assert torch.equal(sparse, drop_below(dense, model.space.threshold))
    assert (sparse == 0).any() and (sparse > 0).any()


def test_a_vlm_named_by_hub_id_is_refused_for_its_language_model(monkeypatch):
    import sae_training.lexvla.model as model_module

    config = tiny_llava().config
    monkeypatch.setattr(model_module.AutoConfig, "from_pretrained", lambda name: config)
    with pytest.raises(ValueError, match="'org/llava' is a VLM: give a local folder"):
        load_text_model("org/llava")


def test_a_save_clears_what_an_earlier_failed_save_left_beside_it(model, tmp_path):
    model.save_pretrained(tmp_path / "lex")
    for leftover in (".lex.tmp", ".lex.old"):  # a half-written folder, a model set aside
        (tmp_path / leftover).mkdir(exist_ok=True)
        (tmp_path / leftover / "stale").write_text("")
    model.save_pretrained(tmp_path / "lex")
    assert not (tmp_path / "lex" / "stale").exists() and not (tmp_path / ".lex.old").exists()
    assert LexVLA.from_pretrained(tmp_path / "lex").words == model.words


def test_a_model_without_a_causal_lm_is_refused_as_the_text_model(monkeypatch):
    """The toy CLIP's kind as --text-model: one line naming it, not transformers' list of
    every causal-LM config class."""
    from transformers import CLIPConfig

    import sae_training.lexvla.model as model_module

    monkeypatch.setattr(model_module.AutoConfig, "from_pretrained", lambda name: CLIPConfig())
    with pytest.raises(ValueError) as error:
        load_text_model("toy/clip")
    assert str(error.value) == ("'toy/clip' is a 'clip' model, whose text side is no causal LM: "
                                "give a Llama-family LM (hub id or folder) or a local llava-hf "
                                "folder")
