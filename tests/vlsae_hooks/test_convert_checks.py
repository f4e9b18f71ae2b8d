"""What ``load_reference`` refuses and where its bounds lie (keys, shapes, layer, k, model type),
what a converted config records, and what ``convert_reference`` leaves in a folder when it
fails or replaces a space."""

import re
import warnings

import pytest
import torch
from helpers.reference import D, H, K, reference_sae
from helpers.spaces import lexvla_space
from safetensors.torch import load_file

from vlsae_hooks import load_space
from vlsae_hooks.convert import convert_reference, load_reference, reference_layer
from vlsae_hooks.spaces.lexvla import LexVLASpace

torch.set_num_threads(1)


def refused(call, message: str) -> None:
    """``call()`` raises a ValueError whose message is exactly ``message``."""
    with pytest.raises(ValueError) as error:
        call()
    assert str(error.value) == message


def test_file_contents_that_are_refused_say_why(reference_files, tmp_path):
    _, aux_path, sae, _ = reference_files
    torch.save(["encoder", "text_decoder.bias"], tmp_path / "names.pth")
    refused(lambda: load_reference(tmp_path / "names.pth", aux_path),
            f"{tmp_path / 'names.pth'} holds a list, not a state dict (name -> tensor)")
    for shape in ((H * D,), (2, H, D)):
        torch.save({**sae, "encoder": torch.randn(shape)}, tmp_path / "flat.pth")
        refused(lambda: load_reference(tmp_path / "flat.pth", aux_path),
                f"{tmp_path / 'flat.pth'}: encoder should be the [h, d] concept matrix, got "
                f"shape {shape}")


def test_a_missing_or_an_extra_key_alone_is_refused(reference_files, tmp_path):
    _, aux_path, sae, _ = reference_files
    expected = ("(expected exactly ['encoder', 'vision_decoder.weight', 'vision_decoder.bias', "
                "'text_decoder.weight', 'text_decoder.bias'])")
    torch.save({k: v for k, v in sae.items() if k != "vision_decoder.bias"}, tmp_path / "m.pth")
    refused(lambda: load_reference(tmp_path / "m.pth", aux_path, k=K),
            f"{tmp_path / 'm.pth'} is not a reference VL-SAE SAE file: missing keys "
            f"['vision_decoder.bias'] {expected}")
    torch.save({**sae, "step_count": torch.zeros(1)}, tmp_path / "u.pth")  # not dropped silently
    refused(lambda: load_reference(tmp_path / "u.pth", aux_path, k=K),
            f"{tmp_path / 'u.pth'} is not a reference VL-SAE SAE file: unexpected keys "
            f"['step_count'] {expected}")


def test_layer_k_and_model_type_bounds(reference_files):
    sae_path, aux_path, _, _ = reference_files
    assert load_reference(sae_path, aux_path, layer=0, n_layers=4).config.layer == 0
    assert load_reference(sae_path, aux_path, layer=3, n_layers=4).config.layer == 3
    with pytest.raises(ValueError, match=re.escape("layer 4 is not a layer of a 4-layer decoder "
                                                   "(0..3)")):
        load_reference(sae_path, aux_path, layer=4, n_layers=4)
    assert load_reference(sae_path, aux_path, k=H).config.k == H  # every concept active
    refused(lambda: load_reference(sae_path, aux_path, k=0), f"k=0 must lie in 1..{H} (the SAE "
                                                            f"has h={H} concepts)")
    refused(lambda: load_reference(sae_path, aux_path, model_type="vit"),
            "model_type must be 'llava' or 'clip', got 'vit'")


def test_clip_weights_record_their_files_and_refuse_a_layer(tmp_path):
    path = tmp_path / "my_clip_sae.pth"  # not the reference's naming: no architecture in it
    torch.save(reference_sae(d=768, h=1536), path)
    with pytest.warns(UserWarning, match="no k was given"):
        space = load_reference(path)
    config = space.config
    assert (config.model_name, config.model_type, config.has_aligner) == ("open_clip", "clip",
                                                                          False)
    assert config.extra == {"reference_files": {"sae": "my_clip_sae.pth", "aux": None}}
    assert not space.training
    with pytest.raises(ValueError, match="layer applies to LLaVA weights; CLIP spaces read"):
        load_reference(path, k=K, layer=3)


def test_llava_weights_record_their_file_names(reference_files):
    sae_path, aux_path, _, _ = reference_files
    space = load_reference(sae_path, aux_path)
    assert space.config.extra == {"reference_files": {"sae": "llava_16_2_best.pth",
                                                      "aux": "llava_aux_best.pt"}}
    assert not space.training and space.config.has_aligner


def test_k_and_its_warnings_follow_the_reference_naming(reference_files, tmp_path):
    sae_path, aux_path, sae, _ = reference_files
    torch.save(sae, tmp_path / "llava_16_2_best.pt")  # .pt as well as .pth
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_reference(tmp_path / "llava_16_2_best.pt", aux_path).config.k == K
    torch.save(sae, tmp_path / "llava_16_8_best.pth")
    torch.save(reference_sae(h=512), tmp_path / "sae.pth")  # room for the default k, 256
    for name in ("llava_16_8_best.pth", "sae.pth"):  # a renamed file, a name without k
        for load in (load_reference, load_space):  # the caller's line, whichever it calls
            with pytest.warns(UserWarning) as record:
                load(tmp_path / name, aux_path)
            assert [warning.filename for warning in record] == [__file__], load


def test_convert_refuses_an_existing_space_unless_asked(reference_files, tmp_path):
    sae_path, aux_path, _, _ = reference_files
    out = tmp_path / "space"
    convert_reference(sae_path, out, aux_path, n_layers=4)
    with pytest.raises(ValueError, match="already holds a concept space"):
        convert_reference(sae_path, out, aux_path, n_layers=4)


def test_a_failed_conversion_leaves_the_old_space_whole(reference_files, tmp_path, monkeypatch):
    sae_path, aux_path, sae, _ = reference_files
    out = tmp_path / "space"
    convert_reference(sae_path, out, aux_path, n_layers=4)
    for name in ("word_readout.json", "metrics.json"):
        (out / name).write_text("{}")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    torch.save({k: v for k, v in sae.items() if k != "encoder"}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="missing keys"):  # checked before anything is removed
        convert_reference(tmp_path / "broken.pth", out, aux_path, overwrite=True, n_layers=4)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    def full_disk(tensors, filename, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("vlsae_hooks.tensor_files.save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        convert_reference(sae_path, out, aux_path, overwrite=True, n_layers=4)
    # the readouts and metrics went (they described the old weights); the old space still loads
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        name: before[name] for name in ("config.json", "model.safetensors")}


def test_convert_over_another_kind_removes_that_kinds_files(reference_files, tmp_path,
                                                            monkeypatch):
    sae_path, aux_path, sae, _ = reference_files
    monkeypatch.setattr(LexVLASpace, "HUB_FILES", (*LexVLASpace.HUB_FILES, "lexicon.json"))
    out = tmp_path / "space"
    lexvla_space([5, 6, 7]).save_pretrained(out)
    (out / "lexicon.json").write_text("{}")
    convert_reference(sae_path, out, aux_path, overwrite=True, n_layers=4)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(load_file(str(out / "model.safetensors"))["sae.concepts"], sae["encoder"])


def test_the_reference_site_needs_two_decoder_layers():
    assert reference_layer(2) == 0  # the steered output of layer 0 is layer 1's input
    for depth in (1, 0):
        refused(lambda depth=depth: reference_layer(depth),
                f"need at least 2 decoder layers to place the reference's site, got {depth}")


@pytest.mark.parametrize(("text", "why"), [
    ("encoder:{'shape': [128, 64]}\n", "it is not a torch.save file"),  # '{' its ninth byte
    ("name,shape\nencoder,128x64\n", "it is not a torch.save file"),  # a csv
    ("", "it is empty or cut short"),
])
def test_a_text_or_empty_file_is_named_in_the_librarys_words(reference_files, tmp_path, text,
                                                              why):
    """Not the unpickler's own words ("pop from empty list", a bare EOFError), nor taken for a
    safetensors file for a '{' at the ninth byte."""
    _, aux_path, _, _ = reference_files
    path = tmp_path / "sae.pth"
    path.write_text(text)
    refused(lambda: load_reference(path, aux_path),
            f"{path} is not a plain tensor state dict that torch.load(weights_only=True) can read "
            f"({why}); only the reference's released state dicts are supported, full pickles "
            "are never unpickled")
