"""An extraction folder read as one table of rows: rows across shards come back in order, and a
folder the store cannot vouch for is refused, naming the shard and what is wrong with it."""

import json
from pathlib import Path

import pytest
import torch

from sae_training.extract import write_manifest
from sae_training.store import MANIFEST, ActivationStore, write_shard


def folder_of(tmp_path: Path, shards: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Path:
    """An extraction folder: each shard written as extraction writes it (its info naming its
    width), and the manifest extraction writes (the first shard's width as the folder's)."""
    for name, (vision, text) in shards.items():
        n = vision.shape[0]
        write_shard(tmp_path / name, vision, text, [f"{name}:{i}" for i in range(n)],
                    [f"caption {i}" for i in range(n)],
                    {"model": "tiny", "d_model": vision.shape[1]})
    write_manifest(tmp_path)
    return tmp_path


def rows(n: int, start: float, width: int = 4) -> torch.Tensor:
    return torch.arange(start, start + n * width, dtype=torch.float32).reshape(n, width)


def test_rows_across_shards_and_their_captions_come_back_in_the_order_asked(tmp_path):
    store = ActivationStore(folder_of(tmp_path, {"a.safetensors": (rows(2, 0), -rows(2, 0)),
                                                 "b.safetensors": (rows(3, 100), -rows(3, 100))}))
    assert len(store) == 5
    vision, text = store.get(torch.tensor([4, 0, 2]))
    assert torch.equal(vision, torch.stack([rows(3, 100)[2], rows(2, 0)[0], rows(3, 100)[0]]))
    assert torch.equal(text, -vision)
    assert store.captions(torch.tensor([3, 1])) == [("b.safetensors:1", "caption 1"),
                                                    ("a.safetensors:1", "caption 1")]
    assert len(ActivationStore(tmp_path, max_samples=3)) == 3


@pytest.mark.parametrize("index", [5, -1])
def test_a_row_outside_the_table_is_an_index_error(tmp_path, index):
    store = ActivationStore(folder_of(tmp_path, {"a.safetensors": (rows(5, 0), rows(5, 0))}))
    with pytest.raises(IndexError, match=r"row index out of range \[0, 5\)"):
        store.get(torch.tensor([0, index]))


def test_a_shard_of_another_width_than_the_manifest_is_refused(tmp_path):
    folder_of(tmp_path, {"a.safetensors": (rows(2, 0), rows(2, 0)),
                         "b.safetensors": (rows(2, 0, width=6), rows(2, 0, width=6))})
    with pytest.raises(ValueError, match=r"b.safetensors: width 6, manifest says 4"):
        ActivationStore(tmp_path)


def test_a_shard_with_vision_and_text_in_two_dtypes_is_refused(tmp_path):
    folder_of(tmp_path, {"a.safetensors": (rows(2, 0), rows(2, 0).half())})
    with pytest.raises(ValueError, match=r"vision is F32 and text F16; a shard stores both in "
                                         r"one dtype \(extract it again\)"):
        ActivationStore(tmp_path)


def test_a_shard_of_an_unsupported_dtype_is_named_with_what_to_run(tmp_path):
    ints = torch.ones(2, 4, dtype=torch.int64)
    folder_of(tmp_path, {"a.safetensors": (ints, ints.clone())})
    with pytest.raises(ValueError, match=r"a.safetensors cannot be read \(ValueError: .*vision "
                                         r"has unsupported dtype I64\).*run `vlsae extract` "
                                         r"again with the same --out"):
        ActivationStore(tmp_path)


def test_a_manifest_of_empty_shards_holds_no_activations(tmp_path):
    """``write_manifest`` refuses a folder without rows; a manifest written otherwise may still
    list only empty shards."""
    write_shard(tmp_path / "a.safetensors", rows(0, 0), rows(0, 0), [], [], {"d_model": 4})
    (tmp_path / MANIFEST).write_text(json.dumps({"d_model": 4, "shards": [
        {"file": "a.safetensors", "count": 0}]}))
    with pytest.raises(ValueError, match=r"holds no activations"):
        ActivationStore(tmp_path)


def test_a_shard_whose_rows_disagree_is_not_written(tmp_path):
    with pytest.raises(ValueError, match=r"shard rows disagree: vision \(2, 4\), text \(3, 4\), "
                                         r"2 keys, 2 captions"):
        write_shard(tmp_path / "a.safetensors", rows(2, 0), rows(3, 0), ["k0", "k1"],
                    ["c0", "c1"], {})
    assert not list(tmp_path.iterdir())
