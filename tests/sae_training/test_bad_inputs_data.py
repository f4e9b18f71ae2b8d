"""Bad input data on the extraction path: damaged tars, wrong paths, ``pipe:`` / URL sources and
data with no usable pairs fail loudly (or, with --skip-bad, are reported and retried later)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers.image_shards import write_shard

from sae_training.cli import main
from sae_training.extract import SKIP_REPORT, extract, write_manifest
from sae_training.extractors import make_extractor
from sae_training.readers import open_source
from sae_training.samples import DataError
from sae_training.store import shard_metadata


def damage(path: Path, kind: str) -> None:
    """Cut a tar at 60%, or replace it by random bytes, or by nothing."""
    data = path.read_bytes()
    path.write_bytes({"cut": data[: int(len(data) * 0.6)],
                      "random": os.urandom(len(data)),
                      "empty": b""}[kind])


def two_shards(folder: Path, damaged: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(folder / "00000.tar", 0, 4)
    write_shard(folder / "00001.tar", 4, 5)
    if damaged:
        damage(folder / "00001.tar", damaged)


@pytest.mark.parametrize("kind", ["cut", "random", "empty"])
def test_damaged_tar_fails_then_is_retried_once_repaired(llava, tmp_path: Path, kind) -> None:
    model, processor = llava
    extractor = make_extractor(model, processor, layer=2)
    two_shards(tmp_path / "data", damaged=kind)
    out = tmp_path / "acts"
    with pytest.raises(DataError, match=r"00001\.tar.*\n.*--skip-bad"):
        extract(extractor, open_source(str(tmp_path / "data")), out, "tiny", batch_size=4)
    assert (out / "00000.safetensors").exists()  # the good part is done and kept
    assert not (out / "00001.safetensors").exists()  # the damaged one is not finished

    two_shards(tmp_path / "data")  # repaired: the re-run does exactly the missing part
    written = extract(extractor, open_source(str(tmp_path / "data")), out, "tiny", batch_size=4)
    assert [p.name for p in written] == ["00001.safetensors"]
    manifest = write_manifest(out, open_source(str(tmp_path / "data")))
    assert manifest["count"] == 9 and manifest["complete"] and not manifest["damaged"]


def test_skip_bad_keeps_what_it_can_reports_and_retries(llava, tmp_path: Path) -> None:
    model, processor = llava
    extractor = make_extractor(model, processor, layer=2)
    two_shards(tmp_path / "data", damaged="cut")
    out = tmp_path / "acts"
    written = extract(extractor, open_source(str(tmp_path / "data")), out, "tiny", batch_size=4,
                      skip_bad=True)
    assert [p.name for p in written] == ["00000.safetensors", "00001.safetensors"]  # both new
    info = shard_metadata(out / "00001.safetensors")["info"]
    assert "end-of-archive" in info["damaged"]
    manifest = write_manifest(out, open_source(str(tmp_path / "data")))
    assert not manifest["complete"] and manifest["damaged"] == ["00001.safetensors"]
    assert 4 <= manifest["count"] < 9
    report = [json.loads(line) for line in (out / SKIP_REPORT).read_text().splitlines()]
    assert {r["shard"] for r in report} == {"00001.safetensors"}
    assert "damaged data part" in {r["reason"] for r in report}

    two_shards(tmp_path / "data")  # repaired: the unfinished shard is redone, the report goes
    written = extract(extractor, open_source(str(tmp_path / "data")), out, "tiny", batch_size=4,
                      skip_bad=True)
    assert [p.name for p in written] == ["00001.safetensors"]
    manifest = write_manifest(out, open_source(str(tmp_path / "data")))
    assert manifest["count"] == 9 and manifest["complete"]
    assert not (out / SKIP_REPORT).exists()


def test_cli_damaged_tar_exits_non_zero_unless_skip_bad(llava_dir: Path, tmp_path: Path,
                                                        caplog) -> None:
    two_shards(tmp_path / "data", damaged="random")
    args = ["extract", "--model", str(llava_dir), "--data", str(tmp_path / "data"),
            "--out", str(tmp_path / "acts"), "--layer", "2", "--batch-size", "4"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert "00001.tar" in str(exit_info.value) and "--skip-bad" in str(exit_info.value)
    assert not (tmp_path / "acts" / "manifest.json").exists()
    main(args + ["--skip-bad"])
    manifest = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    assert manifest["count"] == 4 and not manifest["complete"]
    assert (tmp_path / "acts" / SKIP_REPORT).exists()
    assert "1 damaged data part(s)" in (tmp_path / "acts" / "extract.log").read_text()


@pytest.mark.parametrize("max_samples", [None, 100])
def test_lexvla_training_data_with_a_damaged_tar_stops_unless_skip_bad(tmp_path: Path,
                                                                       max_samples) -> None:
    """LexVLA's stream, as extraction: a cut tar ends the stream once a pass has read it (it
    trained on the readable pairs with a warning only), and ``skip_bad`` goes on without it."""
    from sae_training.lexvla.data import PairStream

    two_shards(tmp_path / "data", damaged="cut")
    spec = str(tmp_path / "data" / "*.tar")
    message = (r"damaged data \(00001: .*\); repair or remove it, or pass --skip-bad to train "
               r"on the readable pairs \(a rerun goes on from the last checkpoint, if one was "
               r"written\)$")  # a run stopped before its first checkpoint kept no steps
    with pytest.raises(DataError, match=message):  # read whole into memory, or streamed
        stream = PairStream(spec, 2, 0, 4, max_samples)
        for step, _, _ in stream.batches():
            assert step < 10  # the first pass ends in the error, not a second pass
    kept = PairStream(spec, 2, 0, 4, max_samples, skip_bad=True)
    steps = [batch[0] for _, batch in zip(range(8), kept.batches())]
    assert steps == list(range(8))  # on past the first pass's 4 steps


def test_no_usable_pairs_is_refused(llava_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    write_shard(tmp_path / "data" / "00000.tar", 0, 3, corrupt=(0, 1, 2))
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", "--model", str(llava_dir), "--data", str(tmp_path / "data"),
              "--out", str(tmp_path / "acts"), "--layer", "2"])
    assert "no usable image-caption pairs" in str(exit_info.value)
    assert not (tmp_path / "acts" / "manifest.json").exists()
    assert len((tmp_path / "acts" / SKIP_REPORT).read_text().splitlines()) == 3


@pytest.mark.parametrize("data", ["missing", "missing/{00000..00003}.tar",
                                  "data/{00000..00003}.tar", "data/*.tgz", "missing.tsv"])
def test_wrong_data_path_fails_before_the_model_loads(tmp_path: Path, data: str) -> None:
    two_shards(tmp_path / "data")
    with pytest.raises(SystemExit) as exit_info:  # the model does not exist either
        main(["extract", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / data),
              "--out", str(tmp_path / "acts")])
    message = str(exit_info.value)
    assert str(tmp_path / data) in message and "no-model" not in message
    assert not (tmp_path / "acts" / "manifest.json").exists()


def test_pipe_and_url_sources_are_refused_without_opt_in(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(DataError, match="--allow-remote-data"):
        list(open_source(f"pipe:touch {marker}"))
    with pytest.raises(DataError, match="--allow-remote-data"):
        open_source([f"pipe:touch {marker}"])
    for url in ("https://example.com/{00000..00001}.tar", "s3://bucket/a.parquet"):
        with pytest.raises(DataError, match="remote URL"):
            open_source(url)
    with pytest.raises(SystemExit, match="--allow-remote-data"):
        main(["extract", "--model", "m", "--data", f"pipe:touch {marker}",
              "--out", str(tmp_path / "acts")])
    assert not marker.exists()
    list(open_source(f"pipe:touch {marker}", allow_remote=True))  # opted in: it does run
    assert marker.exists()


def test_inspect_does_not_run_a_manifest_pipe_source(llava, tmp_path: Path) -> None:
    from vlsae_hooks.testing import random_space

    model, processor = llava
    two_shards(tmp_path / "data")
    acts = tmp_path / "acts"
    extract(make_extractor(model, processor, layer=2), open_source(str(tmp_path / "data")),
            acts, "tiny", batch_size=9)
    marker = tmp_path / "ran"
    write_manifest(acts, data=f"pipe:touch {marker}")
    random_space(model, layer=2, n_concepts=64, k=4).save_pretrained(tmp_path / "run" / "space")
    with pytest.raises(SystemExit, match="--allow-remote-data"):
        main(["inspect", "--run", str(tmp_path / "run"), "--data", str(acts), "--concepts", "0"])
    assert not marker.exists()
