"""The hook-share benchmark: its clock counts the time inside steering hooks once and puts the
classes back, and its run splits each method's excess over plain into inside and outside (a
smoke test on a tiny model: its numbers are measured by running it, never asserted here)."""

import itertools
import json
import sys

import pytest
import torch
from helpers.benchmarks import load_benchmark

from vlsae_hooks.modes.registry import Steerer

torch.set_num_threads(1)


class _Outer(Steerer):
    def _on_call(self) -> str:
        return "outer"


class _Inner(_Outer):
    def _on_call(self) -> str:
        return super()._on_call() + " via inner"


def test_the_hook_clock_counts_a_hook_inside_another_once_and_puts_the_methods_back():
    bench = load_benchmark("hook_share")
    assert {_Outer, _Inner} <= set(bench.steerer_classes())
    before = vars(_Inner)["_on_call"], vars(_Outer)["_on_call"]
    ticks = itertools.count(step=10.0)  # every reading of the clock moves it by 10
    with bench.HookClock(clock=lambda: next(ticks)) as hooks:
        probe = object.__new__(_Inner)  # no model: only the hook is called
        assert probe._on_call() == "outer via inner"
        assert hooks.total == 10.0  # one start and one end: the inner call read no clock
        probe._on_call()
        assert hooks.total == 20.0
    assert (vars(_Inner)["_on_call"], vars(_Outer)["_on_call"]) == before
    assert object.__new__(_Inner)._on_call() == "outer via inner"


def test_each_methods_excess_is_split_into_inside_and_outside_its_hooks():
    bench = load_benchmark("hook_share")
    model, space, _ = bench.load_toy(None)
    with torch.no_grad():
        results = bench.measure(model, space, bench.prompt_inputs(model, n_text=6),
                                new_tokens=4, repeats=1,
                                methods=("vlsae-shift", "vlsae-shift-hooks", "vcd"))
    assert list(results) == ["plain", "vlsae-shift", "vlsae-shift-hooks", "vcd"]
    assert results["plain"]["inside_us"] == 0 == results["plain"]["excess_us"]
    assert results["vcd"]["inside_us"] == 0  # a peer's hooks are not vlsae_hooks' steerers
    for name in ("vlsae-shift", "vlsae-shift-hooks"):
        r = results[name]
        assert r["inside_us"] > 0  # wrapped before attach took the methods
        assert r["outside_us"] == pytest.approx(r["excess_us"] - r["inside_us"])
    assert bench.markdown_table(results).count("\n| ") == 4


def test_the_command_writes_its_results_and_refuses_too_few_tokens(tmp_path, monkeypatch, capsys):
    from vlsae_hooks.testing import tiny_llava

    bench = load_benchmark("hook_share")
    tiny_llava().save_pretrained(tmp_path / "llava")  # no space beside it: a random one
    out = tmp_path / "share.json"
    monkeypatch.setattr(sys, "argv", ["hook_share.py", "--json", str(out), "--toy-model",
                                      str(tmp_path / "llava"), "--methods", "vlsae-evidence",
                                      "--tokens", "3", "--repeats", "1"])
    bench.main()
    written = json.loads(out.read_text())
    assert set(written["methods"]) == {"plain", "vlsae-evidence"}
    assert written["details"]["new_tokens"] == 3
    assert str(tmp_path / "llava") in written["details"]["model"]
    assert "| vlsae-evidence |" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["hook_share.py", "--json", str(out), "--tokens", "2"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--tokens must be at least 3" in capsys.readouterr().err
