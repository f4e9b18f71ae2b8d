"""``python -m eval_suites.toyworld compare``: every method on the same scenes, three outputs."""

import json

import pytest
import torch
from toy_llava import random_toy_llava, save_random_toy_llava

from eval_suites.toyworld.__main__ import main
from eval_suites.toyworld.compare import METRICS, compare
from eval_suites.toyworld.evaluate import EvalSettings, evaluate


def test_compare_command_writes_json_table_and_chart(tmp_path, capsys):
    torch.set_num_threads(1)
    model_dir = save_random_toy_llava(tmp_path / "llava")
    out = tmp_path / "cmp"
    main(["compare", "--seed", "3", "--n-images", "2", "--batch-size", "8", "--model", str(model_dir),
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
    assert "| metric | greedy | vcd | dola |" in table
    for label, _ in METRICS:
        assert f"| {label} |" in table
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| metric |" in capsys.readouterr().out

    # the same numbers as evaluating greedy on its own (greedy decoding is deterministic)
    model, processor = random_toy_llava()
    alone = evaluate("greedy", EvalSettings(seed=3, n_images=2, batch_size=8), model, processor)
    assert alone["pope"] == summary["methods"]["greedy"]["pope"]
    assert alone["chair"] == summary["methods"]["greedy"]["chair"]


def test_compare_rejects_unknown_methods(tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        compare(EvalSettings(n_images=1), tmp_path, ["greedy", "nope"], model=object(), processor=object())
