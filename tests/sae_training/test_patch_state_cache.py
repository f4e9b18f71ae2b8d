"""The ``patch-readout`` cache of image states, with the model replaced by one that reads each
image's first pixel: a chunk is reused only for the images it holds, a damaged one is extracted
again, chunks of another shape are refused, and each chunk's extraction seconds add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from sae_training import patch_state_cache as cache
from sae_training.box_data import BoxedImage
from sae_training.grounding_config import PatchReadoutRunConfig
from sae_training.samples import DataError
from vlsae_hooks.tensor_files import save_tensors


def _images(folder: Path, n: int) -> list[BoxedImage]:
    folder.mkdir()
    images = []
    for i in range(n):
        Image.new("RGB", (4, 4), (10 * i, 0, 0)).save(folder / f"{i}.png")
        images.append(BoxedImage(str(100 + i), folder / f"{i}.png", (4, 4), (), (), ()))
    return images


@pytest.fixture()
def extracted(monkeypatch) -> list[list[int]]:
    """The red values of the images of each chunk the fake model extracts; each takes 2 s."""
    calls, clock = [], [0.0]

    def states(model, processor, images, prompt, layer, batch_size, progress):
        calls.append([image.getpixel((0, 0))[0] for image in images])
        clock[0] += 2.0
        red = torch.tensor(calls[-1], dtype=torch.float32)
        return red[:, None, None].expand(-1, 3, 2).clone()  # [n, P=3, d=2]

    monkeypatch.setattr(cache, "image_patch_states", states)
    monkeypatch.setattr(cache.time, "perf_counter", lambda: clock[0])
    return calls


def test_chunks_are_reused_for_their_own_images_and_timed(tmp_path: Path,
                                                          extracted) -> None:
    images, folder = _images(tmp_path / "images", 5), tmp_path / "cache"
    cfg = PatchReadoutRunConfig(model="m", boxes="b", images="i", space="s", chunk_images=2)
    cache.open_cache(folder, {"model": "m"})
    states = cache.extract_states(None, None, images, cfg, folder)
    assert states[:, 0, 0].tolist() == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert extracted == [[0, 10], [20, 30], [40]]
    assert cache.extraction_seconds(folder, 5, 2) == (6.0, 0)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json",
        "states_00000.safetensors", "states_00001.safetensors", "states_00002.safetensors"]

    (folder / "states_00002.safetensors").write_bytes(b"torn")  # damaged since
    reordered = [images[0], images[1], images[3], images[2], images[4]]  # chunk 1 holds others
    again = cache.extract_states(None, None, reordered, cfg, folder)
    assert again[:, 0, 0].tolist() == [0.0, 10.0, 30.0, 20.0, 40.0]
    assert extracted[3:] == [[30, 20], [40]]  # chunk 0 read back
    assert cache.extraction_seconds(folder, 5, 2) == (6.0, 0)
    save_tensors({"states": torch.zeros(1, 3, 2)}, folder / "states_00002.safetensors",
                 metadata={"keys": json.dumps(["104"])})  # a version that did not time it
    assert cache.extraction_seconds(folder, 5, 2) == (4.0, 1)

    save_tensors({"states": torch.zeros(1, 4, 2)}, folder / "states_00002.safetensors",
                 metadata={"keys": json.dumps(["104"])})  # states of another shape
    with pytest.raises(DataError, match=r"states_00002.safetensors holds states of shape "
                                        r"\(4, 2\), the others \(3, 2\): delete the cache"):
        cache.extract_states(None, None, reordered, cfg, folder)


def test_a_cache_of_another_extraction_is_refused(tmp_path: Path) -> None:
    identity = {"model": "m", "layer": 3, "prompt": "<image>"}
    cache.open_cache(tmp_path / "cache", identity)
    cache.open_cache(tmp_path / "cache", identity)  # the same: reused
    with pytest.raises(DataError, match=r"another extraction \(its layer, prompt differ\)"):
        cache.open_cache(tmp_path / "cache", {**identity, "layer": 4, "prompt": "chat"})
