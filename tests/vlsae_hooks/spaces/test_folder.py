"""Spaces on the Hugging Face hub (offline, from a local cache), the catalogue, steering.json,
atomic saves and refusing non-finite weights. No test touches the network."""

import fnmatch
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.spaces import small_space
from huggingface_hub import HfApi, constants
from safetensors.torch import load_file, save_file

import vlsae_hooks
from vlsae_hooks import KNOWN_SPACES, ConceptSpace, VLSAESpace, WordReadout, load_space
from vlsae_hooks.attach import space_steering
from vlsae_hooks.convert import REFERENCE_LLAVA

torch.set_num_threads(1)
REPO = "vlsae-test/tiny-space"
STEERING = {"mode": "evidence", "strength": 2.0}


def make_readout(n_concepts: int = 32, n_tokens: int = 3) -> WordReadout:
    return WordReadout(torch.randn(n_concepts, n_tokens), torch.zeros(n_tokens),
                       torch.arange(5, 5 + n_tokens), torch.full((n_tokens,), -3.0))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache in tmp, offline: snapshot_download may only read it."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_snapshot(cache: Path, repo_id: str, commit: str, folder: Path,
                   ref: str | None = None) -> None:
    """Lay ``folder`` out as huggingface_hub does: snapshots/<commit>/, refs/<ref> -> commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def test_load_space_by_repo_id_and_revision_from_the_cache(hub_cache, tmp_path):
    first, second = small_space(seed=0), small_space(seed=1)
    first.recommended_steering = dict(STEERING)
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    cache_snapshot(hub_cache, REPO, "a" * 40, tmp_path / "first", ref="main")
    cache_snapshot(hub_cache, REPO, "b" * 40, tmp_path / "second")

    loaded = load_space(REPO)
    assert isinstance(loaded, VLSAESpace) and loaded.recommended_steering == STEERING
    assert torch.equal(loaded.sae.concepts, first.sae.concepts)
    at_commit = load_space(REPO, revision="b" * 40)
    assert torch.equal(at_commit.sae.concepts, second.sae.concepts)
    assert torch.equal(VLSAESpace.from_pretrained(REPO, revision="b" * 40).sae.concepts,
                       second.sae.concepts)
    assert isinstance(ConceptSpace.from_pretrained(REPO), VLSAESpace)


def test_hub_errors_say_what_to_do(hub_cache, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"no such local folder.*not in the Hugging Face "
                       r"cache.*HF_HUB_OFFLINE=1.*`hf download vlsae-test/absent`"):
        load_space("vlsae-test/absent")
    with pytest.raises(FileNotFoundError, match="--revision v2"):
        load_space("vlsae-test/absent", revision="v2")
    small_space().save_pretrained(tmp_path / "local")
    with pytest.raises(ValueError, match="revision='v2' is for hub repo ids"):
        load_space(tmp_path / "local", revision="v2")
    with pytest.raises(FileNotFoundError, match="not a directory"):  # a path, not a repo id
        load_space(tmp_path / "nowhere")
    monkeypatch.chdir(tmp_path)  # a relative local folder shaped like a repo id wins
    small_space().save_pretrained(tmp_path / "org" / "space")
    assert isinstance(load_space("org/space"), VLSAESpace)


def test_push_to_hub_uploads_the_saved_folder(hub_cache, monkeypatch, tmp_path):
    space = small_space()
    space.recommended_steering = dict(STEERING)
    space.word_readout = make_readout()
    calls, remote = [], {"README.md": b"the owner's card"}

    def upload_folder(self, *, repo_id, folder_path, revision, commit_message, delete_patterns):
        """As the hub does: files matching ``delete_patterns`` go unless this commit uploads
        them; the repo's state is cached as a new commit."""
        uploaded = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        calls.append(("upload", repo_id, revision, sorted(uploaded)))
        for name in [n for n in remote if n not in uploaded]:
            if any(fnmatch.fnmatch(name, pattern) for pattern in delete_patterns):
                del remote[name]
        remote.update(uploaded)
        commit = f"{len(calls):040x}"
        state = tmp_path / commit
        state.mkdir()
        for name, data in remote.items():
            (state / name).write_bytes(data)
        cache_snapshot(hub_cache, repo_id, commit, state)
        (hub_cache / ("models--" + repo_id.replace("/", "--")) / "refs").mkdir(exist_ok=True)
        (hub_cache / ("models--" + repo_id.replace("/", "--")) / "refs" / revision).write_text(
            commit)
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/{commit}")

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(
        ("create", repo_id, kw["private"])))
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **kw: calls.append(
        ("branch", repo_id, kw["branch"])))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    url = space.push_to_hub(REPO, private=True, revision="v1")
    assert url.endswith(f"{3:040x}")
    assert calls == [("create", REPO, True), ("branch", REPO, "v1"),
                     ("upload", REPO, "v1", ["config.json", "model.safetensors",
                                             "steering.json", "word_readout.safetensors"])]
    back = load_space(REPO, revision="v1")
    assert back.config == space.config and back.recommended_steering == STEERING
    assert back.word_readout is not None
    assert torch.equal(back.sae.concepts, space.sae.concepts)
    retrained = small_space(seed=1)  # no recommendation, no readout: the old ones must go
    retrained.push_to_hub(REPO, revision="v1")
    back = load_space(REPO, revision="v1")
    assert torch.equal(back.sae.concepts, retrained.sae.concepts)
    assert back.recommended_steering == {} and back.word_readout is None
    assert sorted(remote) == ["README.md", "config.json", "model.safetensors"]


def test_recommended_steering_lives_in_steering_json(tmp_path):
    space = small_space()
    space.recommended_steering = dict(STEERING)
    space.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "steering.json").read_text()) == STEERING
    assert "steering" not in json.loads((tmp_path / "config.json").read_text())["extra"]
    loaded = load_space(tmp_path)
    assert loaded.recommended_steering == STEERING and space_steering(loaded) == STEERING
    assert "recommended_steering={'mode': 'evidence', 'strength': 2.0}" in repr(loaded)
    loaded.recommended_steering = {}
    loaded.save_pretrained(tmp_path)  # none any more: the stale file goes
    assert not (tmp_path / "steering.json").exists()
    assert load_space(tmp_path).recommended_steering == {}

    (tmp_path / "steering.json").write_text(json.dumps({"mode": "evidence", "strenght": 2.0}))
    with pytest.raises(ValueError, match=r"steering.json recommends unknown steering options "
                                         r"\['strenght'\]"):
        space_steering(load_space(tmp_path))
    (tmp_path / "steering.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object of attach options, got list"):
        load_space(tmp_path)


def test_steering_left_in_config_extra_is_moved_with_a_warning(tmp_path):
    small_space().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["extra"]["steering"] = STEERING
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(FutureWarning, match=r"extra.steering; it belongs in steering.json.*re-save"):
        loaded = load_space(tmp_path)
    assert loaded.recommended_steering == STEERING and "steering" not in loaded.config.extra
    loaded.save_pretrained(tmp_path)  # re-saved the new way
    assert json.loads((tmp_path / "steering.json").read_text()) == STEERING
    assert "steering" not in json.loads((tmp_path / "config.json").read_text())["extra"]

    (tmp_path / "config.json").write_text(json.dumps(config))  # both places: ambiguous
    with pytest.raises(ValueError, match="recommends steering twice"):
        load_space(tmp_path)

    in_memory = small_space()
    in_memory.config.extra["steering"] = STEERING
    with pytest.warns(FutureWarning, match="the space's config keeps.*Used it"):
        assert space_steering(in_memory) == STEERING
    # attach reads it and never changes the caller's space
    assert in_memory.recommended_steering == {} and in_memory.config.extra["steering"] == STEERING
    in_memory.recommended_steering = {"mode": "contrast", "alpha": 0.2}  # set, and not that
    for use in (space_steering, lambda space: space.save_pretrained(tmp_path / "both")):
        with pytest.raises(ValueError, match="the space's config recommends steering twice"):
            use(in_memory)
    assert not (tmp_path / "both").exists()  # nothing saved that drops either
    in_memory.recommended_steering = dict(STEERING)  # the same in both places: one, saved
    with pytest.warns(FutureWarning):
        in_memory.save_pretrained(tmp_path / "both")
    assert load_space(tmp_path / "both").recommended_steering == STEERING


def test_a_failed_save_leaves_the_previous_space_intact(tmp_path, monkeypatch):
    old, new = small_space(seed=0), small_space(seed=1)
    old.recommended_steering = dict(STEERING)
    old.save_pretrained(tmp_path)
    (tmp_path / "metrics.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr("vlsae_hooks.tensor_files.save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        new.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp folder left
    assert torch.equal(load_space(tmp_path).sae.concepts, old.sae.concepts)

    monkeypatch.undo()
    new.save_pretrained(tmp_path)  # replaces weights, config and steering; keeps metrics.json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "metrics.json",
                                                          "model.safetensors"]
    assert torch.equal(load_space(tmp_path).sae.concepts, new.sae.concepts)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_file(tmp_path, bad):
    small_space().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    state["aligner.text_decoder.bias"][3] = bad
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=rf"{weights}.*NaN or inf in "
                                         r"\['aligner.text_decoder.bias'\]"):
        load_space(tmp_path)


def test_catalogue_of_known_spaces():
    # the runtime's catalogue lists real models' spaces; the toy world describes its own
    from eval_suites.toyworld.assets_paths import TOY_SPACE, toy_paths

    assert set(KNOWN_SPACES) == {"vlsae-llava-1.5-7b"}
    assert vlsae_hooks.KnownSpace is type(TOY_SPACE)
    space = load_space(TOY_SPACE.path)
    assert space.config.model_name == TOY_SPACE.model_name and TOY_SPACE.convert is None
    assert f"layer {space.config.layer}" in TOY_SPACE.steering_site
    assert TOY_SPACE.path == vlsae_hooks.find_space(SimpleNamespace(
        config=SimpleNamespace(_name_or_path=str(toy_paths().llava))))
    reference = KNOWN_SPACES["vlsae-llava-1.5-7b"]
    assert reference.model_name == REFERENCE_LLAVA and reference.path is None
    docs = (Path(__file__).parents[3] / "docs" / "reproduce.md").read_text()
    assert "ssfgunner/VL-SAE" in reference.source and "ssfgunner/VL-SAE" in docs
    for file in reference.files:
        assert file in docs and Path(file).name in reference.convert
    assert "layer 30" in reference.steering_site


def test_shipped_toy_space_recommends_through_steering_json(tmp_path):
    from eval_suites.toyworld.assets_paths import TOY_SPACE
    from eval_suites.toyworld.spaces import TOY_STEERING, recommend_steering

    folder = TOY_SPACE.path
    assert "steering" not in json.loads((folder / "config.json").read_text())["extra"]
    space = load_space(folder)
    assert space.recommended_steering == TOY_STEERING
    assert recommend_steering(tmp_path) == space.recommended_steering
    assert json.loads((tmp_path / "steering.json").read_text()) == space.recommended_steering


def test_a_space_saved_over_itself_in_half_precision_loads_with_its_readouts(tmp_path):
    from eval_suites.toyworld.assets_paths import TOY_SPACE

    folder = tmp_path / "space"
    shutil.copytree(TOY_SPACE.path, folder)
    record = json.loads((folder / "word_readout.json").read_text())
    load_space(folder).half().save_pretrained(folder)  # its readouts' records name old weights
    again = load_space(folder)
    assert again.dtype == torch.float16 and again.word_readout is not None
    assert again.phrase_readout is not None
    restamped = json.loads((folder / "word_readout.json").read_text())
    assert restamped.pop("space_sha256") != record.pop("space_sha256")
    assert restamped == record  # the fit's metrics kept


def test_a_truncated_weights_file_is_named_with_what_to_do(tmp_path):
    small_space().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # an interrupted copy
    with pytest.raises(ValueError) as error:  # the parser's own words depend on its version
        load_space(tmp_path)
    assert re.fullmatch(rf"{re.escape(str(weights))} is not a readable safetensors file \(.+\): "
                        "the space is damaged; re-convert or re-train it", str(error.value))
