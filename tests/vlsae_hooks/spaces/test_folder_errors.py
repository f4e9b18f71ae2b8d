"""A space folder's files that are not what they should be, and the hub look-up's failures,
each named with what to do (``spaces.folder``); the hub is a stand-in, no test touches the
network."""

import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from helpers.spaces import small_space
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

from vlsae_hooks import VLSAESpace, load_space
from vlsae_hooks.attach import space_steering
from vlsae_hooks.spaces.folder import space_folder

REPO = "vlsae-test/tiny-space"


def test_a_config_or_steering_file_that_is_not_a_spaces_is_named(tmp_path):
    small_space().save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    good = config.read_text()
    config.write_text(good[:-10])  # cut short
    with pytest.raises(ValueError, match=rf"^{config} is not valid JSON: "):
        load_space(tmp_path)
    config.write_text(json.dumps({**json.loads(good), "n_concept": 3}))
    with pytest.raises(ValueError) as error:
        load_space(tmp_path)
    assert str(error.value) == f"{config}: concept-space config has unknown fields ['n_concept']"
    config.write_text("[]")
    with pytest.raises(ValueError, match=rf"^{config}: a concept-space config is a JSON object"):
        load_space(tmp_path)
    config.write_text(good)
    (tmp_path / "steering.json").write_text('{"mode": "evidence",}')
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'steering.json'} is not valid JSON: "):
        load_space(tmp_path)
    (tmp_path / "steering.json").unlink()
    (tmp_path / "steering.json").mkdir()  # not skipped as if there were no recommendation
    with pytest.raises(ValueError) as error:
        load_space(tmp_path)
    assert str(error.value) == (f"{tmp_path / 'steering.json'} is not a file: a space's "
                                "recommended steering is a JSON file of attach options; remove "
                                "or rename what is there")


def test_a_steering_file_recommending_an_unknown_mode_says_the_space_recommends_it(tmp_path):
    small_space().save_pretrained(tmp_path)
    (tmp_path / "steering.json").write_text(json.dumps({"mode": "vcd", "alpha": 1.0}))
    with pytest.raises(ValueError, match=r"^the space's steering.json recommends mode 'vcd', "
                                         r"which is not registered \(modes: \(.*'contrast'.*\)\); "
                                         r"fix the file or import the module that registers it$"):
        space_steering(load_space(tmp_path))


def test_a_legacy_recommendation_warns_at_the_callers_line_when_saved(tmp_path):
    space = small_space()
    space.config.extra["steering"] = {"mode": "evidence", "strength": 2.0}
    with pytest.warns(FutureWarning, match="Moved it there") as record:
        space.save_pretrained(tmp_path)
    assert [warning.filename for warning in record] == [__file__]


class FakeHub:
    """``snapshot_download`` as the hub client: records its keyword arguments, then raises
    ``error`` or returns ``folder``."""

    def __init__(self, folder=None, error=None):
        self.folder, self.error, self.calls = folder, error, []

    def __call__(self, repo_id, **kwargs):
        self.calls.append((repo_id, kwargs))
        if self.error is not None:
            raise self.error
        return str(self.folder)


@pytest.mark.parametrize("offline", [True, False])
def test_a_repo_id_goes_to_the_hub_offline_only_when_told(tmp_path, monkeypatch, offline):
    small_space().save_pretrained(tmp_path / "snapshot")
    hub = FakeHub(folder=tmp_path / "snapshot")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    assert space_folder(REPO, revision="v1") == tmp_path / "snapshot"
    assert hub.calls == [(REPO, {"revision": "v1", "local_files_only": offline})]


def test_hub_failures_say_what_to_do(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        FakeHub(error=RepositoryNotFoundError(  # what it reads of a response
                            "404", response=SimpleNamespace(headers={}, request=None))))
    with pytest.raises(FileNotFoundError) as error:
        space_folder(REPO)
    assert str(error.value) == (
        f"no concept space at {REPO!r}: no such local folder, and hub repo {REPO!r} does not "
        "exist or is not yours to read (log in with `hf auth login` for a private one)")
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        FakeHub(error=LocalEntryNotFoundError("offline")))
    with pytest.raises(FileNotFoundError) as error:
        space_folder(REPO, revision="v2")
    assert str(error.value) == (
        f"no concept space at {REPO!r}: no such local folder, and hub repo {REPO!r} at revision "
        f"'v2' is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub cannot "
        f"be reached. Download it once with network access (`hf download {REPO} --revision v2`),"
        " or pass a local folder")


def test_a_legacy_recommendation_warns_at_the_callers_line_whatever_loads_it(tmp_path):
    from vlsae_hooks import ConceptSpace, VLSAESpace
    from vlsae_hooks.attach import space_steering

    small_space().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["extra"]["steering"] = {"mode": "evidence", "strength": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for load in (load_space, VLSAESpace.from_pretrained, ConceptSpace.from_pretrained):
        with pytest.warns(FutureWarning, match="Moved it there") as record:
            load(tmp_path)
        assert [warning.filename for warning in record] == [__file__], load
    space = small_space()
    space.config.extra["steering"] = {"mode": "evidence", "strength": 2.0}
    with pytest.warns(FutureWarning, match="Used it") as record:
        space_steering(space)
    assert [warning.filename for warning in record] == [__file__]


@pytest.mark.parametrize("name", ["org--x/space", "org/spa..ce", "-org/space", "org/space-",
                                  "org/space/sub", "org/"])
def test_a_name_that_is_no_repo_id_is_a_local_path_never_looked_up(tmp_path, monkeypatch, name):
    """"--" and "..", an edge that is not a letter or digit, a second "/": the hub has no such
    repo, so the name is a local folder that is not there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        FakeHub(error=AssertionError("the hub was asked")))
    assert space_folder(name) == Path(name)
    with pytest.raises(FileNotFoundError, match=r"not a directory$"):
        load_space(name)


def test_a_file_given_as_a_space_folder_is_named_as_not_a_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as error:
        VLSAESpace.from_pretrained(tmp_path / "config.json")
    assert str(error.value) == (f"no concept space at {str(tmp_path / 'config.json')!r}: not a "
                                "directory")


def test_a_revision_is_refused_for_the_references_weight_files(tmp_path):
    weights = tmp_path / "sae.pth"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="revision is for hub repo ids, not the reference's "
                                         "weight files"):
        load_space(weights, revision="main")
