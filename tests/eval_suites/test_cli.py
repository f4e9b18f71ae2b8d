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
                                           ("compare", "--methods"), ("toy", "train-spaces")])
def test_each_command_reaches_its_parser(capsys, command, flag):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert flag in capsys.readouterr().out


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
    (["compare", "--batch-size", "0"], "must be a whole number >= 1, got 0"),
    (["toy", "evaluate", "--n-images", "0"], "must be a whole number >= 1, got 0"),
    (["toy", "evaluate", "--method", "greedyy", "--n-images", "2"], "unknown method 'greedyy'"),
])
def test_toy_world_commands_end_bad_input_with_a_message(tmp_path, capsys, argv, message):
    where = ["--json", str(tmp_path / "r.json")] if "evaluate" in argv else [
        "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        main(argv + where)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
