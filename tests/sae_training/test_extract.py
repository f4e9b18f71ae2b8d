"""Extraction on tiny random-weight llava-hf LLaVA and CLIP models, checked against
``output_hidden_states`` / ``get_*_features``; sharding, resume, 4-bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.image_shards import caption_of, write_shards
from safetensors.torch import load_file

from sae_training import extract as extract_module
from sae_training.config import ExtractConfig
from sae_training.extract import extract, run_extract, write_manifest
from sae_training.extractors import default_layer, make_extractor
from sae_training.readers import open_source
from sae_training.samples import Sample
from sae_training.store import ActivationStore, shard_metadata
from vlsae_hooks.pooling import masked_mean
from vlsae_hooks.testing import tiny_processor


def samples(n: int, start: int = 0) -> list[Sample]:
    import numpy as np
    from PIL import Image

    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        image = Image.fromarray(rng.integers(0, 255, (30 + i % 5, 36, 3), dtype=np.uint8))
        out.append(Sample(f"{i:09d}", image, " ".join(caption_of(i).split()[: 1 + i % 3])))
    return out


def manual_reference(model, processor, batch: list[Sample], index: int):
    """Vision / text means from ``output_hidden_states`` (hidden_states[i] = input of layer i),
    one sample at a time (no padding at all)."""
    vision, text = [], []
    for sample in batch:
        inputs = processor(images=[sample.image], text=[f"USER: <image>\n{sample.caption} "
                                                         "ASSISTANT:"], return_tensors="pt")
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True).hidden_states[index][0]
        ids = inputs["input_ids"][0]
        image = (ids == model.config.image_token_id).nonzero()[:, 0]
        vision.append(hidden[image].mean(0))
        text.append(hidden[image.max() + 1:].mean(0))
    return torch.stack(vision), torch.stack(text)


def test_default_layer_scales_the_reference_site() -> None:
    assert default_layer(32) == 30
    assert default_layer(40) == 38  # round(37.5)
    assert default_layer(4) == 3 and default_layer(2) == 1


@pytest.mark.parametrize("site,layer,index", [("layer_input", 2, 2), ("layer_input", None, 3),
                                              ("layer_output", 1, 2)])
def test_llava_layer_sites_match_hidden_states(llava, site, layer, index) -> None:
    model, processor = llava
    batch = samples(5)
    extractor = make_extractor(model, processor, site=site, layer=layer)
    assert (extractor.site, extractor.layer, extractor.d_model) == (site, index - (site ==
                                                                    "layer_output"), 128)
    vision, text = extractor(batch)  # one left-padded batch of captions of 1-3 words
    ref_vision, ref_text = manual_reference(model, processor, batch, index)
    assert vision.shape == text.shape == (5, 128)
    torch.testing.assert_close(vision, ref_vision, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(text, ref_text, atol=1e-4, rtol=1e-4)
    assert (vision - text).abs().max() > 10 * 1e-4  # the two means really differ


def test_llava_projector_site(llava) -> None:
    model, processor = llava
    batch = samples(3)
    vision, text = make_extractor(model, processor, site="projector_output")(batch)
    ref_vision, ref_text = manual_reference(model, processor, batch, 0)  # embeddings
    torch.testing.assert_close(vision, ref_vision, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text, ref_text, atol=1e-5, rtol=1e-5)
    inputs = processor(images=[batch[0].image], text=["USER: <image>\nw1 ASSISTANT:"],
                       return_tensors="pt")
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"])
    features = getattr(features, "pooler_output", features)
    features = features[0] if isinstance(features, (list, tuple)) else features
    torch.testing.assert_close(vision[0], features.reshape(-1, 128).mean(0), atol=1e-5,
                               rtol=1e-5)


def test_site_errors(llava) -> None:
    model, processor = llava
    with pytest.raises(ValueError, match="out of range"):
        make_extractor(model, processor, layer=4)
    with pytest.raises(ValueError, match="does not apply"):
        make_extractor(model, processor, site="clip_embeds")
    with pytest.raises(ValueError, match="prompt"):
        ExtractConfig(model="m", data="d", out="o", prompt="no placeholders")
    with pytest.raises(ValueError, match="site"):
        ExtractConfig(model="m", data="d", out="o", site="layer_42")


def test_a_qwen_model_is_refused_llavas_prompt_and_takes_its_chat_template() -> None:
    """Qwen2.5-VL's processor expands '<|image_pad|>', not '<image>': with the default prompt
    every batch failed in the processor ('0 <|image_pad|> tokens and 16 images')."""
    from types import SimpleNamespace

    from vlsae_hooks.testing import tiny_qwen2_5_vl

    model, processor = tiny_qwen2_5_vl(), SimpleNamespace(image_token="<|image_pad|>")
    with pytest.raises(ValueError, match=r"'<\|image_pad\|>'.*pass prompt='chat' \(--prompt "
                                         r"chat\)"):
        make_extractor(model, processor)
    assert make_extractor(model, processor, prompt="chat").prompt == "chat"


def test_clip_embeds_match_get_features(tiny_clip_model) -> None:
    model, processor = tiny_clip_model, tiny_processor(tiny_clip_model)
    batch = samples(4)
    extractor = make_extractor(model, processor)
    assert (extractor.site, extractor.d_model) == ("clip_embeds", 64)
    vision, text = extractor(batch)
    inputs = processor(images=[s.image for s in batch], text=[s.caption for s in batch],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=inputs["pixel_values"])
        text_features = model.get_text_features(input_ids=inputs["input_ids"],
                                                attention_mask=inputs["attention_mask"])
    image_features = getattr(image_features, "pooler_output", image_features)
    text_features = getattr(text_features, "pooler_output", text_features)
    torch.testing.assert_close(vision, image_features)
    torch.testing.assert_close(text, text_features)
    with pytest.raises(ValueError, match="only the clip_embeds"):
        make_extractor(model, processor, site="layer_input")


class Counting:
    """Wraps an extractor and counts the samples it sees."""

    def __init__(self, inner) -> None:
        self.inner, self.seen = inner, 0
        self.site, self.layer, self.d_model = inner.site, inner.layer, inner.d_model

    def __call__(self, batch):
        self.seen += len(batch)
        return self.inner(batch)

    def info(self, model_name):
        return self.inner.info(model_name)


def test_extract_shards_resume_and_split(llava, tmp_path: Path) -> None:
    model, processor = llava
    keys = write_shards(tmp_path / "data", n_shards=3, per_shard=4)
    out = tmp_path / "acts"
    counting = Counting(make_extractor(model, processor, layer=2))
    # two "processes": each takes every other part
    extract(counting, open_source(str(tmp_path / "data")), out, "tiny", batch_size=3,
            process_index=1, num_processes=2)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["00001.safetensors"]
    extract(counting, open_source(str(tmp_path / "data")), out, "tiny", batch_size=3,
            process_index=0, num_processes=2)
    assert counting.seen == 12
    manifest = write_manifest(out, open_source(str(tmp_path / "data")))
    assert manifest["count"] == 12 and manifest["complete"]
    assert (manifest["site"], manifest["layer"], manifest["d_model"]) == ("layer_input", 2, 128)
    assert [s["file"] for s in manifest["shards"]] == [f"{i:05d}.safetensors" for i in range(3)]

    store = ActivationStore(out)
    assert [k for k, _ in store.captions(torch.arange(12))] == keys
    ref_vision, ref_text = manual_reference(model, processor, list(open_source(
        str(tmp_path / "data")))[4:6], 2)
    vision, text = store.get(torch.tensor([5, 4]))
    torch.testing.assert_close(vision, ref_vision.flip(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(text, ref_text.flip(0), atol=1e-4, rtol=1e-4)

    # a killed run: one shard lost, a stale tmp file left behind; the restart redoes only it
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    (out / "00001.safetensors").unlink()
    (out / ".00001.safetensors.tmp").write_bytes(b"partial")
    counting.seen = 0
    written = extract(counting, open_source(str(tmp_path / "data")), out, "tiny", batch_size=3)
    assert [p.name for p in written] == ["00001.safetensors"] and counting.seen == 4
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    assert after["00000.safetensors"] == before["00000.safetensors"]
    assert after["00002.safetensors"] == before["00002.safetensors"]
    assert shard_metadata(out / "00001.safetensors")["keys"] == keys[4:8]

    other = make_extractor(model, processor, layer=1)
    with pytest.raises(ValueError, match="already holds activations"):
        extract(other, open_source(str(tmp_path / "data")), out, "tiny")


def test_two_processes_extract_what_one_does(llava_dir, tmp_path: Path) -> None:
    """``torchrun`` with 2 CPU processes (as ``accelerate launch`` on N GPUs): each extracts
    its share of the shards, the main process writes the manifest once both are done, and the
    folder holds what one process writes, bit for bit."""
    write_shards(tmp_path / "data", n_shards=3, per_shard=4)
    args = ["-m", "sae_training", "extract", "--model", str(llava_dir), "--data",
            str(tmp_path / "data"), "--layer", "2", "--batch-size", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone",
                                                 "--nproc_per_node", "2"])):
        subprocess.run([sys.executable, *launcher, *args, "--out", str(tmp_path / out)],
                       check=True, env=env, capture_output=True)
    logs = [(tmp_path / "two" / name).read_text() for name in ("extract.log", "extract.rank1.log")]
    assert ["wrote 00001" in log for log in logs] == [False, True]  # shared out, not run twice
    assert ["wrote 00000" in log for log in logs] == [True, False]
    one, two = (json.loads((tmp_path / out / "manifest.json").read_text())
                for out in ("one", "two"))
    assert one == two and one["complete"] and one["count"] == 12
    for shard in one["shards"]:
        a, b = (load_file(str(tmp_path / out / shard["file"])) for out in ("one", "two"))
        assert a.keys() == b.keys() == {"vision", "text"}
        assert all(torch.equal(a[name], b[name]) for name in a), shard["file"]
        assert (shard_metadata(tmp_path / "one" / shard["file"])
                == shard_metadata(tmp_path / "two" / shard["file"]))


def test_masked_mean_ignores_masked_positions() -> None:
    hidden = torch.arange(24.0).reshape(1, 6, 4)
    mask = torch.tensor([[0, 1, 0, 1, 0, 0]]).bool()
    torch.testing.assert_close(masked_mean(hidden, mask), (hidden[0, 1] + hidden[0, 3])[None] / 2)


def test_run_extract_cli_path_and_4bit(llava_dir, tmp_path: Path, monkeypatch) -> None:
    write_shards(tmp_path / "data", n_shards=2, per_shard=3)
    config = ExtractConfig(model=str(llava_dir), data=str(tmp_path / "data"),
                           out=str(tmp_path / "acts"), layer=2, batch_size=4, max_samples=4,
                           save_dtype="float16")
    checks = []  # the kept shards' data is checked once a run, before the model loads
    check = extract_module.check_same_data
    monkeypatch.setattr(extract_module, "check_same_data",
                        lambda *args: checks.append(check(*args)))
    manifest = run_extract(config)
    assert len(checks) == 1
    assert manifest["count"] == 4 and manifest["dtype"] == "F16" and not manifest["complete"]
    assert (tmp_path / "acts" / "extract.log").read_text().count("wrote") == 2
    assert len(ActivationStore(tmp_path / "acts")) == 4
    assert shard_metadata(tmp_path / "acts" / "00001.safetensors")["info"]["truncated"]
    first = (tmp_path / "acts" / "00000.safetensors").stat().st_mtime_ns
    config.max_samples = None  # a longer run redoes only the part that the cap cut short
    manifest = run_extract(config)
    assert manifest["count"] == 6 and manifest["complete"]
    assert (tmp_path / "acts" / "00000.safetensors").stat().st_mtime_ns == first
    full = ActivationStore(tmp_path / "acts")

    try:
        import bitsandbytes  # noqa: F401
        config4 = ExtractConfig(model=str(llava_dir), data=str(tmp_path / "data"),
                                out=str(tmp_path / "acts4"), layer=2, load_in_4bit=True)
        manifest4 = run_extract(config4)
    except (ImportError, RuntimeError) as error:  # no usable bitsandbytes backend here
        pytest.skip(f"bitsandbytes 4-bit cannot run: {error}")
    assert manifest4["count"] == 6 and manifest4["dtype"] == "F32"
    q_vision, q_text = ActivationStore(tmp_path / "acts4").get(torch.arange(4))
    vision, text = full.get(torch.arange(4))
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(q_vision, vision).min() > 0.9 and cosine(q_text, text).min() > 0.9
    assert (q_vision - vision).abs().max() > 1e-4  # really quantised


def test_pooled_codes_of_a_space_are_the_max_over_positions(llava, tmp_path: Path) -> None:
    from vlsae_hooks.pooling import pooled_code
    from vlsae_hooks.testing import random_space

    model, processor = llava
    space = random_space(model, layer=2, n_concepts=64, k=4)
    space.save_pretrained(tmp_path / "space")
    extractor = make_extractor(model, processor, codes_of=str(tmp_path / "space"))
    assert (extractor.site, extractor.layer, extractor.d_model) == ("layer_input", 2, 64)
    assert extractor.info("m")["codes_of"].startswith(str(tmp_path / "space") + " (sha256 ")
    batch = samples(3)
    vision, text = extractor(batch)
    for i, sample in enumerate(batch):  # one sample at a time, no padding
        inputs = processor(images=[sample.image], text=[f"USER: <image>\n{sample.caption} "
                                                         "ASSISTANT:"], return_tensors="pt")
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True).hidden_states[2]
        image = inputs["input_ids"] == model.config.image_token_id
        after = torch.arange(image.shape[1]) > image[0].nonzero().max()
        torch.testing.assert_close(vision[i], pooled_code(space, hidden, image, "vision")[0],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(text[i], pooled_code(space, hidden, after[None], "text")[0],
                                   atol=1e-5, rtol=1e-5)
    assert int((vision[0] > 0).sum()) > 4  # 16 image positions pooled, not one code
    with pytest.raises(ValueError, match="pass the space's own --site and --layer"):
        make_extractor(model, processor, layer=1, codes_of=str(tmp_path / "space"))
