"""LexVLA's model pieces at exact values: images to pixels, the VLM's pixel normalisation
fallback, the caption's hidden state at the prompt's last token, the image's scores max-pooled
over patches, and a shipped model naming its text model relative to itself."""

from __future__ import annotations

import shutil

import numpy as np
import torch
from helpers.lexvla import images
from PIL import Image

from sae_training.lexvla.losses import lexical_vectors
from sae_training.lexvla.model import LexVLA, images_to_tensor, vlm_pixel_normalisation


def test_images_become_unit_range_pixels_and_a_folder_without_processor_falls_back(tmp_path):
    white = Image.fromarray(np.full((8, 8, 3), 255, dtype=np.uint8))
    assert torch.equal(images_to_tensor([white], 4), torch.ones(1, 3, 4, 4))
    fallback = ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert vlm_pixel_normalisation(str(tmp_path), fallback) == ([0.1, 0.2, 0.3],
                                                                [0.4, 0.5, 0.6])


@torch.no_grad()
def test_text_reads_the_last_prompt_token_and_images_the_best_patch(model):
    captions = ["a red star", "a blue ring and a green square"]
    decoder = model.text_lm.get_base_model().model
    for i, caption in enumerate(captions):
        ids = model.tokenizer([model.config.prompt.format(caption=caption)],
                              return_tensors="pt")["input_ids"]
        alone = decoder(input_ids=ids).last_hidden_state[0, -1]
        assert torch.allclose(model.text_hidden(captions)[i], alone, atol=1e-5)
    pixels = images(2)
    image_scores, _ = model(pixels, captions)
    patches = model.space.patch_features(pixels) @ model.space.vision_codebook.T
    assert torch.equal(image_scores, patches.amax(-2))
    assert torch.allclose(lexical_vectors(image_scores), model.image_vectors(pixels), atol=1e-6)


def test_a_shipped_model_finds_its_text_model_beside_it(model, text_model_dir, tmp_path,
                                                        monkeypatch):
    shutil.copytree(text_model_dir, tmp_path / "ship" / "llm")
    model.save_pretrained(tmp_path / "ship" / "lex", text_model="../llm")
    assert '"text_model": "../llm"' in (tmp_path / "ship" / "lex" / "lexvla.json").read_text()
    monkeypatch.chdir(tmp_path)  # "../llm" names nothing from here
    loaded = LexVLA.from_pretrained(tmp_path / "ship" / "lex")
    assert loaded.words == model.words
    with torch.no_grad():
        assert torch.allclose(loaded.text_vectors(["a red star"]),
                              model.text_vectors(["a red star"]), atol=1e-6)


def test_a_model_trained_on_a_relative_text_model_path_loads_from_any_folder(text_model_dir,
                                                                            tmp_path,
                                                                            monkeypatch):
    """``--text-model some/folder`` given relative to where training ran: the saved model
    records it relative to itself, so it loads from elsewhere (it named nothing from there)."""
    from helpers.lexvla import tiny_config

    shutil.copytree(text_model_dir, tmp_path / "work" / "llm")
    monkeypatch.chdir(tmp_path / "work")
    torch.manual_seed(0)
    model = LexVLA.build(tiny_config("llm")).eval()
    model.save_pretrained(tmp_path / "work" / "runs" / "lex")
    assert '"text_model": "../../llm"' in (tmp_path / "work" / "runs" / "lex" /
                                            "lexvla.json").read_text()
    monkeypatch.chdir(tmp_path)  # "llm" names nothing from here
    loaded = LexVLA.from_pretrained(tmp_path / "work" / "runs" / "lex")
    with torch.no_grad():
        assert torch.allclose(loaded.text_vectors(["a red star"]),
                              model.text_vectors(["a red star"]), atol=1e-6)
