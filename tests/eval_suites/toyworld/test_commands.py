"""``python -m eval_suites.toyworld ...``: each command hands its flags, and with none the
library's own defaults, to the function it runs, and writes and prints where it says (the work
itself stubbed: its own tests are beside)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

import eval_suites.toyworld.compare as compare_module
import eval_suites.toyworld.evaluate as evaluate_module
import eval_suites.toyworld.evidence as evidence_module
import eval_suites.toyworld.export as export_module
import eval_suites.toyworld.grounding as grounding_module
import eval_suites.toyworld.grounding_probe as probe_module
import eval_suites.toyworld.spaces as spaces_module
import eval_suites.toyworld.train as train_module
from eval_suites.toyworld.__main__ import COMMANDS, main
from eval_suites.toyworld.assets_paths import TOY_DIR
from eval_suites.toyworld.command_line import build_parser
from eval_suites.toyworld.evaluate import EvalSettings
from eval_suites.toyworld.evidence import EvidenceSettings
from eval_suites.toyworld.train import ToyTrainConfig
from sae_training.grounding_config import PatchReadoutConfig


def recorder(monkeypatch, module, name: str, returns=None):
    """Replace ``module.name`` with a stub noting each call's (args, kwargs); returns the list."""
    calls = []

    def stub(*args, **kwargs):
        calls.append((args, kwargs))
        return returns(*args, **kwargs) if callable(returns) else returns

    monkeypatch.setattr(module, name, stub)
    return calls


def defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_every_command_the_parser_offers_runs_something_and_nothing_else_is_kept():
    parser = build_parser("toy")
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    assert list(sub.choices) == list(COMMANDS) == [
        "train", "train-spaces", "grounding", "grounding-probe", "evaluate", "export", "compare",
        "evidence"]


def test_train_passes_each_flag_and_fresh_and_prints_the_summary_without_its_config(
        monkeypatch, tmp_path, capsys):
    calls = recorder(monkeypatch, train_module, "train_toy_models",
                     {"config": {"seed": 5}, "clip": {"loss": 0.25}})
    main(["train", "--out", str(tmp_path), "--seed", "5", "--llava-steps", "7", "--threads", "3",
          "--device", "cpu", "--fresh"])
    (out, cfg), kwargs = calls[0]
    assert out == tmp_path and kwargs == {"fresh": True}
    assert (cfg.seed, cfg.llava_steps, cfg.threads, cfg.device) == (5, 7, 3, "cpu")
    shipped = ToyTrainConfig()
    assert (cfg.clip_world, cfg.world, cfg.clip_steps) == (
        shipped.clip_world, shipped.world, shipped.clip_steps)
    assert json.loads(capsys.readouterr().out) == {"clip": {"loss": 0.25}}


@pytest.fixture
def spaces_stubs(monkeypatch):
    """train-spaces' four fits stubbed; the calls of each, by name."""
    calls = {name: recorder(monkeypatch, spaces_module, name, {"words": {"auc": 0.5}})
             for name in ("fit_oracle_readout", "fit_toy_readout")}
    calls["train_toy_spaces"] = recorder(
        monkeypatch, spaces_module, "train_toy_spaces",
        {"llava": {"explained_variance": 0.9, "dead_fraction": 0.0, "concept_agreement": 0.8,
                   "config": {}}})
    calls["fit_toy_grounding"] = recorder(monkeypatch, grounding_module, "fit_toy_grounding",
                                          {"boxes": {"heldout": {"seed": 1}}})
    return calls


@pytest.fixture
def models(tmp_path) -> Path:
    for name in ("llava", "clip"):
        (tmp_path / "models" / name).mkdir(parents=True)
    return tmp_path / "models"


def test_train_spaces_trains_the_given_models_spaces_then_their_grounding(
        spaces_stubs, models, tmp_path, capsys):
    main(["train-spaces", "--models", str(models), "--work", str(tmp_path / "work")])
    assert spaces_stubs["train_toy_spaces"] == [((models, tmp_path / "work"), {})]
    # the grounding readouts are fitted on the model given, into its folder
    assert spaces_stubs["fit_toy_grounding"] == [((models / "llava", str(models / "llava")), {})]
    assert spaces_stubs["fit_toy_readout"] == spaces_stubs["fit_oracle_readout"] == []
    printed = capsys.readouterr().out
    assert '"concept_agreement": 0.8' in printed and '"config"' not in printed


def test_train_spaces_readout_only_refits_the_readouts_and_the_grounding(
        spaces_stubs, models, tmp_path):
    main(["train-spaces", "--models", str(models), "--work", str(tmp_path / "w"),
          "--readout-only"])
    assert spaces_stubs["fit_toy_readout"] == [((models / "llava", tmp_path / "w"), {})]
    assert len(spaces_stubs["fit_toy_grounding"]) == 1
    assert spaces_stubs["train_toy_spaces"] == spaces_stubs["fit_oracle_readout"] == []


def test_train_spaces_oracle_fits_only_the_oracle_readouts(spaces_stubs, models, tmp_path,
                                                           capsys):
    """The oracle leaves the shipped space's readouts and its grounding alone."""
    main(["train-spaces", "--models", str(models), "--work", str(tmp_path / "w"),
          "--oracle-readout-data"])
    assert spaces_stubs["fit_oracle_readout"] == [((models / "llava", tmp_path / "w"), {})]
    assert spaces_stubs["fit_toy_readout"] == spaces_stubs["train_toy_spaces"] == []
    assert spaces_stubs["fit_toy_grounding"] == []
    assert f"ORACLE readouts (pairs without the pair prior) -> {models / 'llava'}" in \
        capsys.readouterr().out


def test_train_spaces_defaults_to_the_shipped_models(spaces_stubs, tmp_path):
    main(["train-spaces", "--work", str(tmp_path / "w")])
    assert spaces_stubs["train_toy_spaces"][0][0][0] == Path(TOY_DIR)


def test_grounding_passes_its_flags_and_defaults_to_the_fit_functions(monkeypatch, tmp_path,
                                                                      capsys):
    fitted = defaults(grounding_module.fit_toy_grounding)
    calls = recorder(monkeypatch, grounding_module, "fit_toy_grounding",
                     {"boxes": {"heldout": {"auc": 0.75}, "config": {}}})
    main(["grounding", "--out", str(tmp_path), "--model", "some/llava", "--n-train", "9",
          "--n-heldout", "4", "--steps", "2"])
    main(["grounding", "--out", str(tmp_path)])
    assert calls == [((tmp_path, "some/llava"), {"n_train": 9, "n_heldout": 4,
                                                 "cfg": PatchReadoutConfig(steps=2)}),
                     ((tmp_path, None), {"n_train": fitted["n_train"],
                                         "n_heldout": fitted["n_heldout"],
                                         "cfg": PatchReadoutConfig()})]
    assert capsys.readouterr().out.count('"auc": 0.75') == 2


def test_grounding_probe_passes_its_flags_and_defaults_and_writes_json_and_table(
        monkeypatch, tmp_path, capsys):
    probed = defaults(probe_module.probe_patch_features)
    calls = recorder(monkeypatch, probe_module, "probe_patch_features", {"features": {}})
    monkeypatch.setattr(probe_module, "probe_table", lambda result: "| table |\n")
    main(["grounding-probe", "--model", "m", "--n-train", "9", "--n-heldout", "4", "--steps",
          "2", "--json", str(tmp_path / "p.json")])
    main(["grounding-probe", "--json", str(tmp_path / "q.json")])
    assert calls == [(("m",), {"n_train": 9, "n_heldout": 4, "cfg": PatchReadoutConfig(steps=2)}),
                     ((None,), {"n_train": probed["n_train"], "n_heldout": probed["n_heldout"],
                                "cfg": PatchReadoutConfig()})]
    assert json.loads((tmp_path / "p.json").read_text()) == {"features": {}}
    assert (tmp_path / "p.md").read_text() == "| table |\n"
    assert "| table |" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["grounding-probe"], ["evidence"]])
def test_a_result_path_that_is_a_folder_is_refused_before_the_work(monkeypatch, tmp_path,
                                                                   capsys, command):
    calls = recorder(monkeypatch, probe_module, "probe_patch_features", {})
    calls += recorder(monkeypatch, evidence_module, "measure_evidence", {})
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--json", str(tmp_path)])
    assert exit_.value.code == 2 and calls == []
    assert f"{tmp_path} is a folder; give a file name" in capsys.readouterr().err


RESULT = {"pope": {"random": {"accuracy": 0.5, "f1": 0.25, "yes_ratio": 0.75}},
          "chair": {"chair_s": 0.1, "chair_i": 0.2, "recall": 0.7, "mean_len": 9.0,
                    "broken_pair": {"chair_i": 0.3, "recall": 0.6, "partner_rate": 0.4}},
          "seconds_per_token": 0.002}


def test_evaluate_defaults_are_the_librarys_and_its_answers_sit_beside_the_result(
        monkeypatch, tmp_path, capsys):
    calls = recorder(monkeypatch, evaluate_module, "evaluate", RESULT)
    main(["evaluate", "--json", str(tmp_path / "r.json")])
    assert calls == [(("greedy", EvalSettings()), {"answers": tmp_path / "r.answers.jsonl"})]
    assert json.loads((tmp_path / "r.json").read_text()) == RESULT
    printed = capsys.readouterr().out
    assert printed.startswith("greedy seed=1 n=200 decoding=greedy\n")
    assert "POPE random      acc 0.500  f1 0.250  yes 0.750" in printed
    assert f"2.00 ms/token  -> {tmp_path / 'r.json'}" in printed


def test_evaluate_passes_each_flag(monkeypatch, tmp_path, capsys):
    calls = recorder(monkeypatch, evaluate_module, "evaluate", RESULT)
    main(["evaluate", "--method", "vcd", "--seed", "3", "--n-images", "4", "--batch-size", "2",
          "--model", "m", "--sample", "--sample-seed", "9", "--answers", str(tmp_path / "a.jsonl"),
          "--json", str(tmp_path / "r.json")])
    assert calls == [(("vcd", EvalSettings(seed=3, n_images=4, batch_size=2, model_path="m",
                                           decoding="sample", sample_seed=9)),
                      {"answers": str(tmp_path / "a.jsonl")})]
    assert capsys.readouterr().out.startswith("vcd seed=3 n=4 decoding=sample sample-seed=9\n")


@pytest.mark.parametrize("folder, says", [
    ("nowhere", "nowhere: no such folder"),
    (".", ": no config.json in this folder"),
    ("clip", "clip is a 'clip' model; the toy world decodes with a LLaVA"),
    ("llava/vlsae_space", "vlsae_space is a concept space's folder"),  # once a random 7B LLaVA
])
@pytest.mark.parametrize("command", [["evaluate", "--json"], ["compare", "--out"]])
def test_a_model_folder_that_holds_no_llava_is_refused_by_name_before_loading(
        monkeypatch, tmp_path, capsys, folder, says, command):
    monkeypatch.setattr(evaluate_module.LlavaForConditionalGeneration, "from_pretrained",
                        lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as exit_:
        main([command[0], "--model", str(TOY_DIR / folder), "--n-images", "1",
              "--methods" if command[0] == "compare" else "--method", "greedy",
              command[1], str(tmp_path / "r.json")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: model {TOY_DIR / folder}") and says in err


def test_export_writes_a_seeds_heldout_scenes_or_only_training_pairs(monkeypatch, tmp_path,
                                                                     capsys):
    heldout = recorder(monkeypatch, export_module, "export_heldout", {"n_images": 1})
    pairs = recorder(monkeypatch, export_module, "export_training_pairs", ["a.tar"])
    main(["export", "--out", str(tmp_path)])
    main(["export", "--out", str(tmp_path), "--seed", "4", "--n-images", "6"])
    assert heldout == [((tmp_path,), {"seed": 1, "n_images": 200}),
                       ((tmp_path,), {"seed": 4, "n_images": 6})] and pairs == []
    main(["export", "--out", str(tmp_path), "--seed", "4", "--n-images", "6", "--pairs"])
    assert pairs == [((tmp_path,), {"seed": 4, "n_pairs": 6})] and len(heldout) == 2
    assert capsys.readouterr().out.endswith(json.dumps({"shards": ["a.tar"]}, indent=2) + "\n")


@pytest.fixture
def compare_stubs(monkeypatch):
    def write_table(settings, *args):
        out = args[-2]
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "compare.md").write_text(f"| table of seed {settings.seed} |\n")

    return {name: recorder(monkeypatch, compare_module, name, write_table)
            for name in ("compare", "compare_seeds")}


def test_compare_one_seed_and_every_method_by_default(compare_stubs, tmp_path, capsys):
    main(["compare", "--out", str(tmp_path)])
    main(["compare", "--seed", "3", "--methods", "greedy,vcd", "--n-images", "4", "--batch-size",
          "2", "--model", "m", "--sample", "--sample-seed", "9", "--out", str(tmp_path)])
    assert compare_stubs["compare"] == [
        ((EvalSettings(), str(tmp_path), None), {}),
        ((EvalSettings(seed=3, n_images=4, batch_size=2, model_path="m", decoding="sample",
                       sample_seed=9), str(tmp_path), ["greedy", "vcd"]), {})]
    assert compare_stubs["compare_seeds"] == []
    assert capsys.readouterr().out == "| table of seed 1 |\n\n| table of seed 3 |\n\n"


def test_compare_several_seeds_runs_each_in_order(compare_stubs, tmp_path):
    main(["compare", "--seed", "4,2", "--out", str(tmp_path)])
    assert compare_stubs["compare_seeds"] == [
        ((EvalSettings(seed=4), [4, 2], str(tmp_path), None), {})]
    assert compare_stubs["compare"] == []


def test_evidence_defaults_are_the_librarys_and_flags_reach_it(monkeypatch, tmp_path):
    scores = {"present_vs_absent_partner": 0.5, "absent_partner_vs_other_absent": 0.5,
              "present_vs_absent_same_colour": 0.5}
    calls = recorder(monkeypatch, evidence_module, "measure_evidence",
                     {"probes": {"layer_0_input": scores}, "model_yes_margin": scores,
                      "headroom": 0.0})
    main(["evidence", "--json", str(tmp_path / "a.json")])
    main(["evidence", "--seed", "3", "--n-images", "4", "--n-train", "8", "--model", "m",
          "--json", str(tmp_path / "b.json")])
    assert calls == [((EvidenceSettings(),), {}),
                     ((EvidenceSettings(seed=3, n_images=4, n_train=8, model_path="m"),), {})]
    assert json.loads((tmp_path / "b.json").read_text())["headroom"] == 0.0


@pytest.mark.parametrize("module, name, argv, hint", [
    (evaluate_module, "evaluate", ["evaluate", "--json", "OUT/r.json"],
     "rerun the same command to resume (from the answers written so far)"),
    (export_module, "export_heldout", ["export", "--out", "OUT/x"],
     "rerun the same command to start it over"),
])
def test_an_interrupted_command_says_how_to_go_on_with_status_130(monkeypatch, tmp_path, capsys,
                                                                  module, name, argv, hint):
    """Ctrl-C ends a command with status 130 and says what its rerun does: ``evaluate`` goes on
    from its answers, ``export`` (which keeps nothing) starts over."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, name, interrupted)
    with pytest.raises(SystemExit) as exit_:
        main([arg.replace("OUT", str(tmp_path)) for arg in argv])
    assert exit_.value.code == 130
    assert capsys.readouterr().err == f"interrupted; {hint}\n"
    assert not (tmp_path / "r.json").exists()
