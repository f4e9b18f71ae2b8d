"""The concept sheet: each chosen concept's strongest rows per modality (as a full table says,
in any batching), its top images read back by key and its top captions, the most used concepts
by default; bad concept ids and refused sources end with a message."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import matplotlib
import matplotlib.figure
import numpy as np
import pytest
import torch
from helpers.activations import write_activations
from helpers.image_shards import caption_of, jpeg_bytes, write_shards
from helpers.spaces import small_space
from PIL import Image

from sae_training.extract import write_manifest
from sae_training.inspection import _load_images, concept_sheet, most_used, top_rows
from sae_training.samples import DataError, Sample
from sae_training.store import ActivationStore, write_shard

matplotlib.use("Agg")
N = 40
"""Rows of the sheet's activations, one per image of ``write_shards(.., 2, 20)``."""
NEVER = 7
"""A concept aimed away from every row: never among the top k of either modality."""


@pytest.fixture
def sheet_data(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(space folder, activations folder, image shards): 8-wide rows in the positive orthant
    (vision and text apart), keys and captions of the images; the manifest names a source that
    is gone, so images come only from an explicit ``source``."""
    space = small_space(has_aligner=False, seed=1)
    with torch.no_grad():
        space.sae.concepts[NEVER] = -torch.ones(8)
    space.save_pretrained(tmp_path / "space")
    write_shards(tmp_path / "images", n_shards=2, per_shard=N // 2)
    g = torch.Generator().manual_seed(0)
    vision, text = torch.rand(N, 8, generator=g) + 0.1, torch.rand(N, 8, generator=g) + 0.1
    keys = [f"{i:09d}" for i in range(N)]
    info = {"model": "toy", "model_type": "llava", "site": "layer_input", "layer": 2,
            "d_model": 8, "prompt": None}
    (tmp_path / "acts").mkdir()
    for s in range(2):  # two shards: rows are located across files
        rows = slice(s * N // 2, (s + 1) * N // 2)
        write_shard(tmp_path / "acts" / f"{s:05d}.safetensors", vision[rows], text[rows],
                    keys[rows], [caption_of(i) for i in range(N)][rows], info)
    write_manifest(tmp_path / "acts", data=str(tmp_path / "moved-away"))
    return tmp_path / "space", tmp_path / "acts", tmp_path / "images"


def reference(space, store: ActivationStore, n_rows: int, concepts: list[int],
              n_top: int) -> dict[str, torch.Tensor]:
    """The strongest rows per concept from the whole [rows, concepts] table at once."""
    out = {}
    for modality, x in zip(("vision", "text"), store.get(torch.arange(n_rows))):
        dense = space.encode(x, modality)[:, concepts].T
        top = dense.topk(n_top, dim=1)
        out[modality] = torch.where(top.values > 0, top.indices, -1)
    return out


def test_top_rows_equal_the_full_table_in_any_batching(sheet_data) -> None:
    _, acts, _ = sheet_data
    store = ActivationStore(acts)
    space = small_space(has_aligner=True, seed=2)  # each modality through its own projection
    concepts = list(range(32))
    expected = reference(space, store, N, concepts, 6)
    assert not torch.equal(expected["vision"], expected["text"])
    short = ((expected["vision"] == -1).any(1) & (expected["vision"] >= 0).any(1)).nonzero()
    assert len(short), "some concept should fire on fewer rows than shown"
    for batch_size in (7, 1024):
        got = top_rows(space, store, torch.arange(N), concepts, 6, batch_size)
        for modality in ("vision", "text"):
            assert torch.equal(got[modality], expected[modality]), (batch_size, modality)


def test_most_used_counts_both_modalities_over_every_row(tmp_path: Path) -> None:
    """Vision rows all fire set C (1100 times), text rows 0-499 set A and 500-1099 set B: the
    8 most used are C and B, which only rows past the first 1024 and both modalities tell."""
    space = small_space(has_aligner=False)
    concepts = space.sae.concepts.detach()
    a, b, c = 3 * concepts[0], 3 * concepts[3], 3 * concepts[11]
    sets = [set(space.encode(v[None], "text")[0].nonzero()[:, 0].tolist()) for v in (a, b, c)]
    assert len(set.union(*sets)) == 12, "A, B and C should be 4 concepts each, apart"
    text = torch.cat([a.expand(500, -1), b.expand(600, -1)])
    info = {"model": "toy", "model_type": "llava", "site": "layer_input", "layer": 2,
            "d_model": 8, "prompt": None}
    (tmp_path / "acts").mkdir()
    write_shard(tmp_path / "acts" / "00000.safetensors", c.expand(1100, -1).clone(), text,
                [str(i) for i in range(1100)], ["c"] * 1100, info)
    write_manifest(tmp_path / "acts")
    store = ActivationStore(tmp_path / "acts")
    assert set(most_used(space, store, torch.arange(1100), 8)) == sets[1] | sets[2]
    assert set(most_used(space, store, torch.arange(1100), 4)) == sets[2]


def test_more_concepts_asked_than_the_space_has_shows_them_all(tmp_path: Path) -> None:
    write_activations(tmp_path / "acts", n=50, d=8)
    space, store = small_space(has_aligner=False), ActivationStore(tmp_path / "acts")
    assert sorted(most_used(space, store, torch.arange(50), 100)) == list(range(32))


def drawn(monkeypatch) -> list[matplotlib.figure.Figure]:
    figures: list = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: figures.append(fig))
    return figures


def test_sheet_shows_each_concepts_top_images_and_captions(sheet_data, tmp_path,
                                                            monkeypatch) -> None:
    space_dir, acts, images = sheet_data
    from vlsae_hooks.spaces.vlsae import VLSAESpace

    space, store = VLSAESpace.from_pretrained(space_dir), ActivationStore(acts, 30)
    first = int(space.encode(store.get(torch.tensor([0]))[0], "vision")[0].argmax())
    every = reference(space, store, 30, list(range(32)), 4)
    one_sided = next(c for c in range(32) if (every["vision"][c] >= 0).any()
                     != (every["text"][c] >= 0).any())
    concepts = [NEVER, first, 3, one_sided]
    expected = reference(space, store, 30, concepts, 4)
    assert 0 in expected["vision"][1].tolist()  # row 0 is among the shown images
    figures = drawn(monkeypatch)
    out = concept_sheet(space_dir, acts, tmp_path / "new" / "sheet.png", concepts, n_top=4,
                        source=str(images), max_samples=30)
    assert out == tmp_path / "new" / "sheet.png" and out.parent.is_dir()
    axes = np.array(figures[0].axes).reshape(4, 5)
    assert [row[0].get_title(loc="left") for row in axes] == [
        f"concept {NEVER} (never active)", f"concept {first}", "concept 3",
        f"concept {one_sided}"]
    for i in range(4):
        rows = [r for r in expected["vision"][i].tolist() if r >= 0]
        shown = [ax.images[0].get_array() for ax in axes[i][:4] if ax.images]
        assert len(shown) == len(rows) and not any(ax.images for ax in axes[i][len(rows):4])
        for row, array in zip(rows, shown):
            jpeg = Image.open(io.BytesIO(jpeg_bytes(row))).convert("RGB")
            assert np.array_equal(np.asarray(array), np.asarray(jpeg))
        text_rows = [r for r in expected["text"][i].tolist() if r >= 0]
        assert axes[i][4].texts[0].get_text() == "\n".join(caption_of(r) for r in text_rows)
        assert i != 2 or len(text_rows) > 1


def test_sheet_refuses_concepts_out_of_range_and_remote_sources(sheet_data, tmp_path,
                                                                monkeypatch) -> None:
    space_dir, acts, _ = sheet_data
    drawn(monkeypatch)
    for bad in (32, -1):
        with pytest.raises(ValueError, match=rf"concepts \[{bad}\] out of range \[0, 32\)"):
            concept_sheet(space_dir, acts, tmp_path / "s.png", [1, bad])
    with pytest.raises(DataError, match="runs a shell command; refused by default"):
        concept_sheet(space_dir, acts, tmp_path / "s.png", [1], source="pipe:cat a.tar")


def test_sheet_of_moved_data_shows_captions_and_says_so(sheet_data, tmp_path, monkeypatch,
                                                        caplog) -> None:
    space_dir, acts, _ = sheet_data
    figures = drawn(monkeypatch)
    with caplog.at_level(logging.WARNING):
        concept_sheet(space_dir, acts, tmp_path / "s.png", [1], n_top=2)
    assert "moved-away" in caplog.text and "pass --source" in caplog.text
    assert not any(ax.images for ax in figures[0].axes) and figures[0].axes[2].texts


def samples_then_fail(keys: list[str]):
    """A source that yields ``keys`` and then fails: a scan must stop once it has what it
    needs."""
    for key in keys:
        yield Sample(key, Image.new("RGB", (2, 2)), "c")
    raise AssertionError("read past the samples needed")


def test_images_are_read_once_and_only_as_far_as_needed() -> None:
    found = _load_images(samples_then_fail(["a", "b", "c"]), {"a", "c"})
    assert sorted(found) == ["a", "c"]
    assert _load_images(samples_then_fail([]), set()) == {}


def test_images_missing_from_the_source_are_counted_in_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        found = _load_images([Sample("a", Image.new("RGB", (2, 2)), "c")], {"a", "y", "z"})
    assert list(found) == ["a"]
    assert "2 of 3 images were not found in the image source" in caplog.text
    assert "pass --source" in caplog.text
