"""The ``vlsae`` console script reaches every package's commands with their own arguments."""

import shutil
import subprocess

import pytest

from eval_suites.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    main([])
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in COMMANDS)


@pytest.mark.parametrize("command, flag", [("convert", "--sae"), ("extract", "--codes-of"),
                                           ("readout", "--phrases"),
                                           ("patch-readout", "--min-cover"), ("pope", "--limit"),
                                           ("compare", "--methods"), ("toy", "train-spaces"),
                                           ("lexvla", "evaluate")])
def test_each_command_reaches_its_parser_under_its_own_name(capsys, command, flag):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert flag in shown and shown.startswith(f"usage: vlsae {command} ")


def test_a_subcommand_of_a_group_is_named_as_typed(capsys):
    with pytest.raises(SystemExit):
        main(["toy", "evaluate", "--help"])
    assert capsys.readouterr().out.startswith("usage: vlsae toy evaluate ")


def test_unknown_command_is_named():
    with pytest.raises(SystemExit, match="unknown command 'evalute'"):
        main(["evalute"])


def test_installed_script_runs():
    script = shutil.which("vlsae")
    assert script, "the vlsae console script is not installed: pip install -e ."
    done = subprocess.run([script, "convert", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--aux" in done.stdout


@pytest.mark.parametrize("argv, message", [
    (["compare", "--seed", "2,x"], "comma-separated seeds (2,3,4), got '2,x'"),
    (["compare", "--batch-size", "0"], "must be at least 1, got 0"),
    (["toy", "evaluate", "--n-images", "0"], "must be at least 1, got 0"),
    (["toy", "evaluate", "--method", "greedyy", "--n-images", "2"], "unknown method 'greedyy'"),
    (["compare", "--seed", "2,3,2"], "names a seed twice: '2,3,2'"),
    (["toy", "train", "--clip-steps", "0"], "must be at least 1, got 0"),
    (["toy", "train", "--threads", "0"], "must be at least 1, got 0"),
    (["toy", "train", "--clip-hidden-prob", "nan"], "must be a probability in [0, 1], got nan"),
    (["toy", "train", "--clip-hidden-prob", "2"], "must be a probability in [0, 1], got 2"),
    (["toy", "train", "--device", "nonsense"], "device nonsense:"),
])
def test_toy_world_commands_end_bad_input_with_a_message(tmp_path, capsys, argv, message):
    where = ["--json", str(tmp_path / "r.json")] if "evaluate" in argv else [
        "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        main(argv + where)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_toy_world_commands_check_their_paths_before_the_work(tmp_path, capsys):
    """A --json that is a folder fails before the evaluation (it failed after it); train-spaces
    names the models folder it cannot use (it drew 8,000 pairs first); an export refuses a
    folder holding another artifact's manifest.json (it deleted it)."""
    folder = tmp_path / "a_folder"
    folder.mkdir()
    other = tmp_path / "extraction"
    other.mkdir()
    (other / "manifest.json").write_text('{"d_model": 64, "parts": []}')
    for argv, message in [
        (["toy", "evaluate", "--json", str(folder)], f"{folder} is a folder; give a file name"),
        (["toy", "train-spaces", "--models", str(tmp_path / "nope"), "--work", str(tmp_path)],
         f"holds no {tmp_path / 'nope' / 'llava'} or {tmp_path / 'nope' / 'clip'}"),
        (["toy", "export", "--n-images", "2", "--out", str(other)],
         "holds a manifest.json that is not a toy-world export's (keys ['d_model', 'parts'])"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    assert (other / "manifest.json").read_text() == '{"d_model": 64, "parts": []}'
