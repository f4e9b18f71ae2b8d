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


def test_refused_input_leaves_out_as_it_was_and_a_failed_run_keeps_its_log(
        tmp_path: Path, monkeypatch) -> None:
    """A refusal left a fresh --out holding only extract.log, which looked like a started run."""
    (tmp_path / "empty").mkdir()
    for data in ("nowhere", "empty"):  # no such path; a folder with no shards
        with pytest.raises(FileNotFoundError, match="check the path or pattern"):
            extract_module.run_extract(ExtractConfig(model="m", data=str(tmp_path / data),
                                                     out=str(tmp_path / "new" / "acts")))
        assert not (tmp_path / "new").exists()
    write_shards(tmp_path / "data", n_shards=2, per_shard=2)
    out = tmp_path / "acts"
    no_model(monkeypatch, KeyRows())
    extract_module.run_extract(ExtractConfig(model="m", data=str(tmp_path / "data"), out=str(out)))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "extract.log" in before

    def load_model(*args):
        raise OSError("no such model")

    monkeypatch.setattr(extract_module, "load_model", load_model)
    with pytest.raises(OSError, match="no such model"):
        extract_module.run_extract(ExtractConfig(model="m", data=str(tmp_path / "data"),
                                                 out=str(out)))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    def make_extractor(*args):
        raise ValueError("--layer 9 is out of range")

    monkeypatch.setattr(extract_module, "load_model", lambda *args: (None, None))
    monkeypatch.setattr(extract_module, "make_extractor", make_extractor)
    with pytest.raises(ValueError, match="out of range"):  # the model's own refusal
        extract_module.run_extract(ExtractConfig(model="m", data=str(tmp_path / "data"),
                                                 out=str(tmp_path / "new" / "acts")))
    assert not (tmp_path / "new").exists()

    class Failing(KeyRows):
        def __call__(self, batch: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
            raise RuntimeError("out of memory")

    no_model(monkeypatch, Failing())
    with pytest.raises(RuntimeError, match="out of memory"):  # after the work started
        extract_module.run_extract(ExtractConfig(model="m", data=str(tmp_path / "data"),
                                                 out=str(tmp_path / "failed")))
    assert (tmp_path / "failed" / "extract.log").is_file()


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_a_llava_next_or_qwen_folder_extracts_images_of_other_sizes_batched_as_one_by_one(
        family: str, tmp_path: Path) -> None:
    """The documented extraction with ``--prompt chat`` on a saved LLaVA-NeXT or Qwen2.5-VL
    folder: webdataset pairs whose images take other numbers of image tokens give, left-padded
    in one batch, the rows they give one at a time."""
    import io

    import numpy as np
    from helpers.image_shards import write_tar

    from vlsae_hooks.testing import tiny_llava_next, tiny_processor, tiny_qwen2_5_vl

    model = {"llava_next": tiny_llava_next, "qwen2_5_vl": tiny_qwen2_5_vl}[family](n_layers=2)
    model.save_pretrained(tmp_path / "model")
    tiny_processor(model).save_pretrained(tmp_path / "model")
    rng, members = np.random.default_rng(0), []
    for i, (h, w) in enumerate([(32, 64), (64, 32), (40, 40), (48, 80), (30, 33)]):
        image = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(image, "JPEG")
        members += [(f"{i:09d}.jpg", image.getvalue()), (f"{i:09d}.txt", f"w{i} w9".encode())]
    (tmp_path / "pairs").mkdir()
    write_tar(tmp_path / "pairs" / "00000.tar", members)
    rows = []
    for batch_size in (5, 1):
        out = tmp_path / f"acts{batch_size}"
        manifest = extract_module.run_extract(ExtractConfig(
            model=str(tmp_path / "model"), data=str(tmp_path / "pairs"), out=str(out),
            prompt="chat", layer=1, batch_size=batch_size))
        assert manifest["count"] == 5 and manifest["prompt"] == "chat"
        rows.append(ActivationStore(out).get(torch.arange(5)))
    for batched, alone in zip(*rows, strict=True):
        assert torch.isfinite(batched).all()
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
