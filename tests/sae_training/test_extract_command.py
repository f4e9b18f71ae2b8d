"""``run_extract`` (the ``extract`` command) hands the config's reader options to the reader
and checks the data before it loads the model; the model is replaced by a model-free extractor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.extraction import KeyRows
from helpers.image_shards import write_shards
from PIL import Image

import sae_training.extract as extract_module
from sae_training.config import ExtractConfig
from sae_training.samples import Sample
from sae_training.store import ActivationStore, shard_metadata


class PixelRows(KeyRows):
    """Rows of a sample's image: its first pixel's red value in every column (text: that
    plus 1), so a shard tells which image each row was read from."""

    def __call__(self, batch: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        vision = torch.tensor([[float(s.image.getpixel((0, 0))[0])] * self.d_model
                               for s in batch])
        return vision, vision + 1


def no_model(monkeypatch, extractor: KeyRows) -> None:
    monkeypatch.setattr(extract_module, "load_model", lambda *args: (None, None))
    monkeypatch.setattr(extract_module, "make_extractor", lambda *args: extractor)


def test_the_commands_columns_and_part_size_reach_the_reader(tmp_path: Path,
                                                             monkeypatch) -> None:
    for i in range(4):
        Image.new("RGB", (4, 4), (10 * i, 0, 0)).save(tmp_path / f"{i}.png")
    rows = ["caption,image,alt,photo"] + [f"plain {i},0.png,alt {i},{i + 1}.png" for i in range(3)]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    no_model(monkeypatch, PixelRows())
    config = ExtractConfig(model="m", data=str(tmp_path / "pairs.csv"), out=str(tmp_path / "acts"),
                           caption_column="alt", image_column="photo", rows_per_part=2)
    manifest = extract_module.run_extract(config)
    assert [(s["file"], s["count"]) for s in manifest["shards"]] == [("00000.safetensors", 2),
                                                                     ("00001.safetensors", 1)]
    first, second = (shard_metadata(tmp_path / "acts" / f"0000{i}.safetensors") for i in (0, 1))
    assert first["captions"] + second["captions"] == ["alt 0", "alt 1", "alt 2"]
    vision, _ = ActivationStore(tmp_path / "acts").get(torch.arange(3))
    assert vision[:, 0].tolist() == [10.0, 20.0, 30.0]  # the photo column's images


def test_other_data_is_refused_before_the_model_loads(tmp_path: Path, monkeypatch) -> None:
    write_shards(tmp_path / "a", n_shards=1, per_shard=2)
    write_shards(tmp_path / "b", n_shards=1, per_shard=3)
    out = tmp_path / "acts"
    extract_module.extract(KeyRows(), extract_module.open_source(str(tmp_path / "a")), out,
                           "tiny")

    def load_model(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(extract_module, "load_model", load_model)
    with pytest.raises(ValueError, match=f"{out} holds activations of other data"):
        extract_module.run_extract(ExtractConfig(model="m", data=str(tmp_path / "b"),
                                                 out=str(out)))
