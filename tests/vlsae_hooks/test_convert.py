"""Reference-format weights (the released .pth / .pt key names, small dims) through load and
convert."""

import json
import pickle
import warnings

import pytest
import torch
from helpers.reference import D, H, K, reference_aux, reference_sae
from safetensors.torch import load_file, save_file

from vlsae_hooks import attach, load_space
from vlsae_hooks.__main__ import main as cli
from vlsae_hooks.convert import reference_layer

torch.set_num_threads(1)


def formula_encode(x, sae, aux, projection):
    """a_j = 2 - || x/|x| - C_j/|C_j| || after the aux projection, top-k kept, rest zero."""
    if aux is not None:
        x = x @ aux[f"{projection}.weight"].T + aux[f"{projection}.bias"]
    unit_x = x / x.norm(dim=-1, keepdim=True)
    unit_c = sae["encoder"] / sae["encoder"].norm(dim=-1, keepdim=True)
    a = 2 - (unit_x[:, None, :] - unit_c[None]).norm(dim=-1)
    top = a.topk(K, dim=-1)
    return torch.zeros_like(a).scatter_(-1, top.indices, top.values)


def formula_decode_text(z, sae, aux):
    """aux_dec_t(D_t(z))."""
    y = z @ sae["text_decoder.weight"].T + sae["text_decoder.bias"]
    if aux is not None:
        y = y @ aux["text_decoder.weight"].T + aux["text_decoder.bias"]
    return y


def check_formulas(space, sae, aux):
    torch.manual_seed(5)
    x = torch.randn(6, D)
    for modality in ("vision", "text"):
        expected = formula_encode(x, sae, aux, f"{modality}_projection")
        torch.testing.assert_close(space.encode(x, modality), expected, atol=1e-6, rtol=0)
    z = formula_encode(x, sae, aux, "text_projection")
    torch.testing.assert_close(space.decode(z, "text"), formula_decode_text(z, sae, aux),
                               atol=1e-6, rtol=0)


def test_llava_reference_loads_with_the_reference_formulas(reference_files):
    sae_path, aux_path, sae, aux = reference_files
    space = load_space(sae_path, aux_path, k=K)
    config = space.config
    assert ((config.source, config.site, config.layer, config.k)
            == ("reference", "layer_input", 30, K))
    assert (config.d_model, config.n_concepts, config.model_type) == (D, H, "llava")
    assert config.model_name == "llava-hf/llava-1.5-7b-hf" and config.has_aligner
    check_formulas(space, sae, aux)


def test_cli_converts_once_to_safetensors_and_config(reference_files, tmp_path, capsys):
    sae_path, aux_path, sae, aux = reference_files
    out = tmp_path / "converted"
    cli(["convert", "--sae", str(sae_path), "--aux", str(aux_path), "--out", str(out),
         "--k", str(K), "--layer", "2", "--model-name", "toy/llava"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["steered_by_default"] == "output of decoder layer 2"
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("model_name", "model_type", "site", "layer", "d_model",
                                   "n_concepts", "k", "source")} == {
        "model_name": "toy/llava", "model_type": "llava", "site": "layer_input", "layer": 2,
        "d_model": D, "n_concepts": H, "k": K, "source": "reference"}
    stored = load_file(str(out / "model.safetensors"))
    assert torch.equal(stored["sae.concepts"], sae["encoder"])
    assert torch.equal(stored["aligner.text_decoder.bias"], aux["text_decoder.bias"])
    check_formulas(load_space(out), sae, aux)


def test_clip_reference_has_no_aligner(tmp_path):
    sae = reference_sae(d=512, h=1024)
    path = tmp_path / "openclip_ViT-B-32_VL_SAE_256_2_best.pth"
    torch.save(sae, path)
    space = load_space(path)
    config = space.config
    assert ((config.model_type, config.site, config.layer, config.k)
            == ("clip", "clip_embeds", None, 256))
    assert config.model_name == "open_clip/ViT-B-32" and space.aligner is None
    x = torch.randn(3, 512)
    unit_c = sae["encoder"] / sae["encoder"].norm(dim=-1, keepdim=True)
    a = 2 - (x[:, None] / x.norm(dim=-1, keepdim=True)[:, None] - unit_c[None]).norm(dim=-1)
    torch.testing.assert_close(space.encode(x, "vision").topk(256).values, a.topk(256).values,
                               atol=1e-6, rtol=0)


def test_site_depth_and_steering_defaults(reference_files, model):  # 4 decoder layers, 64 wide
    sae_path, aux_path, _, _ = reference_files
    assert reference_layer(32) == 30 and reference_layer(40) == 38
    space = load_space(sae_path, aux_path, k=K, n_layers=4, model_name="toy")
    assert space.config.layer == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with attach(model, space) as handle:
            assert handle.site_layer == 3  # the reference steers the output of its layer
    with pytest.warns(UserWarning, match="reference steers one layer later"):
        with attach(model, space, layer=2, site="input") as handle:
            assert handle.site_layer == 2  # where it was trained


def test_width_that_does_not_fit_the_model(tmp_path, model):
    torch.save(reference_sae(d=128, h=256), tmp_path / "sae.pth")
    torch.save(reference_aux(d=128), tmp_path / "aux.pt")
    space = load_space(tmp_path / "sae.pth", tmp_path / "aux.pt", k=K, n_layers=4)
    with pytest.raises(ValueError, match="encodes 128-wide states but the model's decoder "
                                         "layers are 64 wide"):
        attach(model, space)


class NotAStateDict:
    pass


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_wrong_files_give_clear_errors(reference_files, tmp_path):
    _, aux_path, sae, _ = reference_files
    save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="safetensors file.*folder"):
        load_space(tmp_path / "model.safetensors")
    torch.save(NotAStateDict(), tmp_path / "object.pth")
    with pytest.raises(ValueError, match="not a plain tensor state dict.*never unpickled") as error:
        load_space(tmp_path / "object.pth", aux_path)
    # in the library's words, not torch's advice
    assert ("torch.load(weights_only=True) can read (it holds objects other than tensors: "
            f"{NotAStateDict.__module__}.NotAStateDict); only the reference's released state "
            "dicts are supported") in str(error.value)
    (tmp_path / "text.pth").write_text("hello world\n")  # torch.load fails with a KeyError
    (tmp_path / "noise.pth").write_bytes(bytes(range(7, 250)))  # an opcode no pickle has
    with open(tmp_path / "pickle.pth", "wb") as f:
        pickle.dump(NotAStateDict(), f)  # a pickle, but not torch.save's
    for name in ("text.pth", "noise.pth", "pickle.pth"):  # not the unpickler's key or opcode
        with pytest.raises(ValueError) as error:
            load_space(tmp_path / name, aux_path)
        assert str(error.value).startswith(
            f"{tmp_path / name} is not a plain tensor state dict that torch.load(weights_only="
            "True) can read (it is not a torch.save file); ")
    torch.save({**sae, 3: torch.zeros(1)}, tmp_path / "int_key.pth")
    with pytest.raises(ValueError, match="holds a dict, not a state dict"):
        load_space(tmp_path / "int_key.pth", aux_path)
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        load_space(tmp_path / "list.pth", aux_path)
    torch.save({**sae, "step": 3}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"entries \['step'\] are not tensors"):
        load_space(tmp_path / "extra.pth", aux_path)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        load_space(tmp_path / "absent.pth", aux_path)
    broken = {**sae, "encoder": sae["encoder"].clone()}
    broken["encoder"][5, 7] = float("nan")  # a corrupt download
    torch.save(broken, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=r"nan.pth holds NaN or inf in \['encoder'\]: the SAE "
                                         "weights are corrupt"):
        load_space(tmp_path / "nan.pth", aux_path)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_space(tmp_path)


def test_wrong_keys_are_named(reference_files, tmp_path):
    sae_path, aux_path, sae, _ = reference_files
    broken = {k: v for k, v in sae.items() if k != "text_decoder.bias"}
    broken["W_enc"] = sae["encoder"]
    torch.save(broken, tmp_path / "keys.pth")
    with pytest.raises(ValueError, match=r"missing keys \['text_decoder.bias'\]; "
                                         r"unexpected keys \['W_enc'\]"):
        load_space(tmp_path / "keys.pth", aux_path)
    with pytest.raises(ValueError,
                       match=r"auxiliary file: missing keys \['vision_projection.weight'"):
        load_space(sae_path, sae_path)  # the SAE given as its own auxiliary file


def test_shapes_that_disagree_are_named(reference_files, tmp_path):
    sae_path, aux_path, sae, aux = reference_files
    torch.save({**sae, "text_decoder.weight": torch.zeros(D, H + 1)}, tmp_path / "sae.pth")
    with pytest.raises(ValueError, match=r"text_decoder.weight has shape \(64, 129\), but encoder "
                                         r"\(128, 64\).*implies \(64, 128\)"):
        load_space(tmp_path / "sae.pth", aux_path)
    torch.save({**aux, "text_projection.bias": torch.zeros(D + 1)}, tmp_path / "aux.pt")
    with pytest.raises(ValueError, match=r"text_projection.bias has shape \(65,\), but the SAE "
                                         r"llava_16_2_best.pth \(d=64\) implies \(64,\)"):
        load_space(sae_path, tmp_path / "aux.pt")
    with pytest.raises(ValueError, match="k=256 must lie in 1..128"):
        load_space(sae_path, aux_path, k=256)


def test_llava_without_aux_and_other_misuse(reference_files, tmp_path):
    sae_path, aux_path, _, _ = reference_files
    with pytest.raises(ValueError, match="need their auxiliary alignment file"):
        load_space(sae_path, model_type="llava", k=K)
    with pytest.raises(ValueError) as error:
        load_space(sae_path, k=K)
    assert str(error.value) == (f"{sae_path} is a 64-wide SAE given without an auxiliary file: "
                                "released OpenCLIP spaces are (512, 768, 1024) wide, LLaVA ones "
                                "need aux=... / --aux. For another CLIP, pass model_type='clip' / "
                                "--model-type clip explicitly")
    with pytest.raises(ValueError, match="CLIP spaces have none"):
        load_space(sae_path, aux_path, model_type="clip", k=K)
    load_space(sae_path, aux_path, k=K).save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="is a directory; expected the reference's torch.save"):
        load_space(tmp_path / "saved", aux_path)


def test_cli_reports_errors_without_traceback(reference_files, tmp_path, capsys):
    sae_path, _, _, _ = reference_files
    with pytest.raises(SystemExit) as exit_info:
        cli(["convert", "--sae", str(sae_path), "--model-type", "llava",
             "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "auxiliary alignment file" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    for extra, message in ((["--out", str(tmp_path / "a-file")],
                            "a-file is a file; a space is saved as a folder of files: give a "
                            "folder's path\n"),
                           (["--layer", "-1", "--out", str(tmp_path / "o")],
                            "error: layer -1 is not a layer of a 32-layer decoder (0..31); pass "
                            "the target model's depth as n_layers=... / --n-layers, or a layer "
                            "inside it\n"),
                           (["--layer", "40", "--out", str(tmp_path / "o")],
                            "error: layer 40 is not a layer of a 32-layer decoder (0..31)")):
        with pytest.raises(SystemExit) as exit_info:
            cli(["convert", "--sae", str(sae_path), "--aux", str(reference_files[1]), *extra])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == ""  # kept as it was


def test_k_comes_from_the_reference_file_name(reference_files, tmp_path):
    sae_path, aux_path, sae, aux = reference_files  # llava_16_2_best.pth
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_space(sae_path, aux_path).config.k == K
        assert load_space(sae_path, aux_path, k=8).config.k == 8  # an explicit k wins
    torch.save(reference_sae(h=512), tmp_path / "my_sae.pth")
    with pytest.warns(UserWarning, match="no k was given: using k=256"):
        assert load_space(tmp_path / "my_sae.pth", aux_path).config.k == 256
    torch.save(sae, tmp_path / "llava_16_8_best.pth")  # h = 2 d, the name says 8
    with pytest.warns(UserWarning, match="says expansion 8, but its weights have h=128"):
        assert load_space(tmp_path / "llava_16_8_best.pth", aux_path).config.k == K


def test_cli_refuses_to_convert_over_a_space_unless_asked(reference_files, tmp_path, capsys):
    """--overwrite replaces the space and removes what described the old one: readouts would
    load with the new weights, metrics.json would report the old."""
    sae_path, aux_path, sae, _ = reference_files
    out = tmp_path / "space"
    convert = ["convert", "--sae", str(sae_path), "--aux", str(aux_path), "--out", str(out),
               "--n-layers", "4"]
    cli(convert)
    stale = ["word_readout.safetensors", "word_readout.json", "phrase_readout.safetensors",
             "phrase_readout.json", "patch_readout.safetensors", "patch_readout.json",
             "steering.json", "metrics.json"]
    for name in [*stale, "README.md"]:
        (out / name).write_text("{}")
    before = (out / "model.safetensors").read_bytes()
    torch.save({**sae, "encoder": -sae["encoder"]}, sae_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli(convert)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {out} already holds a concept space; pass overwrite=True / --overwrite to "
        "replace it (its readouts and metrics.json are removed too), or choose another folder\n")
    assert (out / "model.safetensors").read_bytes() == before  # left as it was
    assert all((out / name).is_file() for name in stale)
    cli([*convert, "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json",
                                                     "model.safetensors"]
    assert torch.equal(load_file(str(out / "model.safetensors"))["sae.concepts"],
                       -sae["encoder"])
