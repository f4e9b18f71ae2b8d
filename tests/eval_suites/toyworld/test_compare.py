"""``python -m eval_suites.toyworld compare``: every method on the same scenes, with the toy
model; its JSON, table, chart and log."""

import json

import pytest
import torch

from eval_suites.toyworld.__main__ import main
from eval_suites.toyworld.compare import ARROWS, METRICS, compare
from eval_suites.toyworld.evaluate import EvalSettings, evaluate, result_line


def test_compare_command_writes_json_table_and_chart(toy_llava, toy_llava_dir, tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "cmp"
    main(["compare", "--seed", "3", "--n-images", "2", "--batch-size", "8",
          "--model", str(toy_llava_dir),
          "--methods", "greedy,vcd,dola", "--out", str(out)])
    summary = json.loads((out / "compare.json").read_text())
    assert list(summary["methods"]) == ["greedy", "vcd", "dola"]
    for name, result in summary["methods"].items():
        assert result["method"] == name and result["n_images"] == 2
        assert set(result["pope"]) == {"random", "popular", "adversarial", "negated", "binding"}
        assert result["decoding"] == "greedy" and result["sample_seed"] == 55
        assert {"chair_s", "chair_i", "recall", "mean_len", "broken_pair"} <= set(result["chair"])
        assert result["seconds_per_token"] > 0 and result["ratio_to_greedy"] > 0
    assert summary["methods"]["greedy"]["ratio_to_greedy"] == 1.0

    table = (out / "compare.md").read_text()
    assert "| metric | better | greedy | vcd | dola |" in table
    for label, _, better in METRICS:
        assert f"| {label} | {ARROWS[better]} |" in table
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| metric |" in capsys.readouterr().out

    log = [line.split(" ", 2)[2] for line in (out / "compare.log").read_text().splitlines()]
    assert log[0] == f"INFO comparing greedy, vcd, dola on seed 3 into {out}"
    for name, result in summary["methods"].items():
        assert f"INFO {name}: {result_line(result)}" in log
    assert log[-1] == f"INFO wrote {out / 'compare.json'}, {out / 'compare.md'}, " \
                      f"{out / 'compare.png'}"

    # the same numbers as evaluating greedy on its own (greedy decoding is deterministic)
    model, processor = toy_llava
    alone = evaluate("greedy", EvalSettings(seed=3, n_images=2, batch_size=8), model, processor)
    assert alone["pope"] == summary["methods"]["greedy"]["pope"]
    assert alone["chair"] == summary["methods"]["greedy"]["chair"]


def test_compare_rejects_unknown_methods(tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        compare(EvalSettings(n_images=1), tmp_path, ["greedy", "nope"], model=object(),
                processor=object())


def test_compare_refuses_a_method_named_twice_before_loading_the_model(tmp_path, capsys):
    """``--methods greedy,vcd,greedy`` ran greedy twice and kept one column, silently."""
    with pytest.raises(ValueError, match=r"methods \['greedy'\] named more than once; name each"):
        compare(EvalSettings(n_images=1), tmp_path, ["greedy", "vcd", "greedy"], object(),
                object())
    with pytest.raises(SystemExit) as exit_:  # several seeds: refused before the model loads
        main(["compare", "--seed", "2,3", "--methods", "vcd,vcd", "--model",
              str(tmp_path / "no model here"), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "methods ['vcd'] named more than once" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_several_seeds_report_mean_and_range(toy_llava_dir, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "cmp"
    main(["compare", "--seed", "3,4", "--n-images", "2", "--batch-size", "8", "--model",
          str(toy_llava_dir), "--methods", "greedy,sample", "--out", str(out)])
    combined = json.loads((out / "compare.json").read_text())
    per_seed = [json.loads((out / f"seed-{s}" / "compare.json").read_text()) for s in (3, 4)]
    assert combined["seeds"] == [3, 4]
    for name in ("greedy", "sample"):
        cell = combined["methods"][name]["POPE adversarial F1"]
        values = [s["methods"][name]["pope"]["adversarial"]["f1"] for s in per_seed]
        assert cell["values"] == values and cell["mean"] == sum(values) / 2
        assert (cell["min"], cell["max"]) == (min(values), max(values))
    assert "mean (min-max over the seeds)" in (out / "compare.md").read_text()
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (out / "compare.log").read_text()  # one log: each seed's comparison, then the spread
    assert [f"comparing greedy, sample on seed {s} into {out / f'seed-{s}'}" in log
            for s in (3, 4)] == [True, True]
    assert log.endswith(f"INFO wrote the spread over seeds 3, 4: {out / 'compare.json'}, "
                        f"{out / 'compare.md'}, {out / 'compare.png'}\n")
