"""The toy models' builders reproduce the shipped toy models' layout file for file (a model
trained or tested from them speaks the shipped tokenizer's ids), and their tokenizers pad and
end text as each model needs."""

import json

import pytest
from transformers import CLIPConfig, LlavaConfig

from eval_suites.toyworld.assets_paths import toy_paths
from eval_suites.toyworld.build import (
    EOS,
    VOCAB_ROWS,
    build_clip_processor,
    build_llava_processor,
    build_tokenizer,
    clip_config,
    llava_config,
)
from eval_suites.toyworld.language import vocabulary


def _saved(processor, folder) -> dict[str, object]:
    processor.save_pretrained(folder)
    return {p.name: (json.loads(p.read_text()) if p.suffix == ".json" else p.read_text())
            for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("kind", ["llava", "clip"])
def test_the_processors_are_the_shipped_ones_file_for_file(kind, tmp_path):
    shipped = getattr(toy_paths(), kind)
    build = build_llava_processor if kind == "llava" else build_clip_processor
    saved = _saved(build(), tmp_path)
    assert "tokenizer.json" in saved and "processor_config.json" in saved
    for name, content in saved.items():
        text = (shipped / name).read_text()
        assert content == (json.loads(text) if name.endswith(".json") else text), name


@pytest.mark.parametrize("kind", ["llava", "clip"])
def test_the_model_configs_are_the_shipped_ones(kind):
    shipped = getattr(toy_paths(), kind)
    if kind == "llava":
        built, saved = llava_config(build_tokenizer()), LlavaConfig.from_pretrained(shipped)
    else:
        built = clip_config(build_tokenizer(for_clip=True))
        saved = CLIPConfig.from_pretrained(shipped)
    ignore = {"architectures", "dtype", "torch_dtype", "transformers_version"}
    a, b = built.to_dict(), saved.to_dict()
    assert {k: v for k, v in a.items() if k not in ignore} == {
        k: v for k, v in b.items() if k not in ignore}


def test_clip_text_ends_at_eos_padded_right_and_llava_prompts_pad_left():
    clip, llava = build_tokenizer(for_clip=True), build_tokenizer()
    assert clip.convert_tokens_to_ids(EOS) != 2  # CLIP would pool at argmax(input_ids)
    batch = clip(["a red star", "a red star and a blue ring"], padding=True)
    assert batch.input_ids[0][:5] == [clip.bos_token_id, *clip("a red star",
                                      add_special_tokens=False).input_ids, clip.eos_token_id]
    assert batch.input_ids[0][5:] == [clip.pad_token_id] * 4
    pair = clip("a red star", "a blue ring").input_ids
    assert pair[0] == clip.bos_token_id and pair[-1] == clip.eos_token_id and len(pair) == 8
    batch = llava(["yes", "a red star"], padding=True)
    assert batch.input_ids[0] == [llava.pad_token_id] * 2 + [llava.bos_token_id,
                                                             llava.convert_tokens_to_ids("yes")]
    assert llava("a red star", "a blue ring").input_ids[-1] != llava.eos_token_id
    assert llava.model_max_length == clip.model_max_length == 512


def test_every_word_is_one_token_and_fits_the_embedding_rows():
    tok = build_tokenizer()
    words = vocabulary()
    assert len(set(words)) == len(words)
    ids = [tok(w, add_special_tokens=False).input_ids for w in words]
    assert all(len(i) == 1 and i[0] != tok.unk_token_id for i in ids)
    assert max(i[0] for i in ids) < VOCAB_ROWS and len(tok) <= VOCAB_ROWS
    assert tok("RED Star.", add_special_tokens=False).input_ids == tok(
        "red star .", add_special_tokens=False).input_ids
