"""``python -m vlsae_hooks``: the options reach the converter, what it prints, a missing
command."""

import json

import pytest
import torch
from helpers.reference import reference_sae

from vlsae_hooks.__main__ import main as cli

torch.set_num_threads(1)


def test_k_and_depth_reach_the_converter_and_the_summary_names_the_folder(reference_files,
                                                                          tmp_path, capsys):
    sae_path, aux_path, _, _ = reference_files  # llava_16_2_best.pth: k 16 by its name
    out = tmp_path / "space"
    cli(["convert", "--sae", str(sae_path), "--aux", str(aux_path), "--out", str(out),
         "--k", "4", "--n-layers", "6"])
    printed = json.loads(capsys.readouterr().out)
    # the site sits as far from the end as the reference's (30 of 32): layer 4 of 6
    assert (printed["out"], printed["k"], printed["layer"]) == (str(out), 4, 4)
    assert printed["steered_by_default"] == "output of decoder layer 4"
    config = json.loads((out / "config.json").read_text())
    assert (config["k"], config["layer"]) == (4, 4)


def test_weights_without_aux_convert_as_clip(tmp_path, capsys):
    path = tmp_path / "openclip_ViT-B-32_VL_SAE_256_2_best.pth"
    torch.save(reference_sae(d=512, h=1024), path)
    cli(["convert", "--sae", str(path), "--out", str(tmp_path / "clip")])
    printed = json.loads(capsys.readouterr().out)
    assert (printed["model_type"], printed["site"], printed["layer"]) == ("clip", "clip_embeds",
                                                                          None)
    assert "steered_by_default" not in printed  # no decoder layer to steer


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli([])
    assert exit_info.value.code == 2
    assert "the following arguments are required: command" in capsys.readouterr().err

