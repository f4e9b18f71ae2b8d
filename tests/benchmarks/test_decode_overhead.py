"""The decode-overhead benchmark times every method (a smoke test; its numbers are measured by
running it, never asserted here), and its end-to-end arithmetic."""

import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers.benchmarks import load_benchmark

from vlsae_hooks.modes.contrast import ContrastOptions
from vlsae_hooks.testing import random_space

torch.set_num_threads(1)

EVERY_METHOD = {"plain", "vlsae", "vlsae-contrast", "vlsae-shift", "vlsae-reference",
                "vlsae-evidence", "vlsae-cutoff", "vlsae-grounding", "vcd", "dola", "vti",
                "vista"}


def test_decode_overhead_times_every_method_on_a_tiny_model():
    bench = load_benchmark("decode_overhead")
    assert set(bench.METHODS) == EVERY_METHOD
    model, space, description = bench.load_toy(None)
    assert "random tiny" in description
    with torch.no_grad():
        measured = bench.measure(model, space, bench.prompt_inputs(model, n_text=6),
                                 new_tokens=3, repeats=1)
    ratios = measured["ratios"]
    assert set(ratios) == EVERY_METHOD - {"plain"}
    assert set(measured["seconds"]) == EVERY_METHOD
    for name, both in ratios.items():
        for ratio in (both["one_token"], both["caption"]):
            assert math.isfinite(ratio) and ratio > 0, (name, ratio)
    for seconds in measured["seconds"].values():
        assert seconds["first_token"] > 0 and seconds["decode_per_token"] > 0
    verdict = bench.default_verdict(ratios, space)
    assert verdict["meets_limit"] == (max(verdict["one_token"], verdict["caption"]) <= 1.10)
    table = bench.markdown_table({"toy": ratios, "default": {"toy": verdict}})
    assert all(f"| {name} |" in table for name in EVERY_METHOD - {"plain"})


def test_end_to_end_ratios_from_first_token_and_per_token_seconds():
    bench = load_benchmark("decode_overhead")
    assert bench.end_to_end(2.0, 0.5, 1) == 2.0
    assert bench.end_to_end(2.0, 0.5, 512) == 2.0 + 511 * 0.5
    plain = [(2.0, 1.0), (2.0, 1.0), (4.0, 1.0)]
    method = [(3.0, 1.1), (2.0, 1.2), (4.0, 2.0)]  # per repeat: paired with plain's
    ratios = bench.paired_ratios(method, plain, caption_tokens=512)
    assert ratios["one_token"] == pytest.approx(1.0)  # median of 1.5, 1.0, 1.0
    expected = sorted([(3 + 511 * 1.1) / 513, (2 + 511 * 1.2) / 513, (4 + 511 * 2.0) / 515])
    assert ratios["caption"] == pytest.approx(expected[1])


def test_decode_overhead_defaults_to_the_shipped_toy_model(monkeypatch):
    import eval_suites.toyworld.assets_paths as assets
    from eval_suites.toyworld.assets_paths import toy_paths

    benchmark = load_benchmark("decode_overhead")
    assert benchmark.default_toy_model() == str(toy_paths().llava)
    monkeypatch.setattr(assets, "TOY_DIR", Path("/no/toy/assets"))  # a checkout without them
    assert benchmark.default_toy_model() is None  # the documented random tiny LLaVA


@pytest.mark.parametrize("processes", [1, 2])
def test_side_by_side_times_each_tree_with_its_own_code(tmp_path, processes):
    """Two trees (here a copy of this runtime and this checkout) each time the methods in their
    own workers, on one model; each worker reports which vlsae_hooks it ran; with two rounds
    each tree's ratios come with their range over them."""
    import vlsae_hooks

    bench = load_benchmark("decode_overhead")
    timing = sys.modules["decode_timing"]
    copy = tmp_path / "copy"
    shutil.copytree(Path(vlsae_hooks.__file__).parent, copy / "vlsae_hooks")
    repo = Path(__file__).parents[2]
    trees = {"baseline": copy, "current": repo}
    model = bench.toy_model(None)
    with torch.no_grad():
        measured = timing.measure_side_by_side(
            trees, model, lambda models, m: models.toy_space(m, None),
            bench.prompt_inputs(model, n_text=6), new_tokens=3, repeats=2,
            methods=("vlsae-shift", "vlsae-evidence"), processes=processes)
    for name, src in trees.items():
        assert Path(measured[name]["ready"]["vlsae_hooks"]).is_relative_to(src)
        assert set(measured[name]["ratios"]) == {"vlsae-shift", "vlsae-evidence"}
        assert measured[name]["errors"] == {}
        for both in measured[name]["ratios"].values():
            assert all(math.isfinite(both[what]) and both[what] > 0
                       for what in ("one_token", "caption"))
            assert ("range" in both) == (processes > 1)
        assert len(measured[name].get("per_process", [None])) == processes
    assert set(measured["current_vs_baseline"]) == {"plain", "vlsae-shift", "vlsae-evidence"}
    results = {"trees": trees, "toy": {**{t: measured[t]["ratios"] for t in trees},
                                       "current_vs_baseline": measured["current_vs_baseline"]}}
    table = bench.markdown_table(results)
    assert "| vlsae-shift | baseline |" in table and "| vlsae-evidence | current |" in table


def test_several_processes_of_one_tree_give_medians_and_ranges(tmp_path, monkeypatch, capsys):
    """``--processes 2`` times this tree in two rounds, each in a fresh worker: each ratio is the
    median of the two rounds' own (for two, their mean), "range" their lowest and highest, every
    round's ratios in the details, and the table shows the range; the results keep the
    one-process layout (no tree column)."""
    import json

    from vlsae_hooks.testing import tiny_llava

    bench = load_benchmark("decode_overhead")
    tiny_llava().save_pretrained(tmp_path / "llava")  # no space beside it: a random one
    out = tmp_path / "run.json"
    monkeypatch.setattr(sys, "argv", [
        "decode_overhead.py", "--json", str(out), "--toy-model", str(tmp_path / "llava"),
        "--skip-7b", "--toy-repeats", "1", "--toy-tokens", "2", "--methods", "vlsae-shift",
        "--processes", "2", "--clock", "cpu"])
    bench.main()
    results = json.loads(out.read_text())
    shift = results["toy"]["vlsae-shift"]
    per_process = results["details"]["toy"]["per_process"]
    assert results["details"]["toy"]["processes"] == 2 and len(per_process) == 2
    assert results["details"]["tree"]["src"] == str(Path(__file__).resolve().parents[2])
    for what in ("one_token", "caption"):
        own = sorted(p["vlsae-shift"][what] for p in per_process)
        assert shift["range"][what] == own
        assert shift[what] == pytest.approx(sum(own) / 2)
    table = capsys.readouterr().out
    low, high = shift["range"]["caption"]
    assert f"| vlsae-shift | {shift['one_token']:.2f}x (" in table
    assert f"{shift['caption']:.2f}x ({low:.2f}-{high:.2f}) |" in table


def test_pooled_takes_the_median_and_range_of_the_processes():
    load_benchmark("decode_overhead")
    timing = sys.modules["decode_timing"]
    per_process = [{"ratios": {"m": {"one_token": r, "caption": 2 * r}},
                    "seconds": {"m": {"first_token": r, "decode_per_token": r / 10}}}
                   for r in (1.3, 1.1, 1.2)]
    pooled = timing.pooled(per_process)
    assert pooled["ratios"]["m"] == {"one_token": 1.2, "caption": 2.4,
                                     "range": {"one_token": [1.1, 1.3], "caption": [2.2, 2.6]}}
    assert pooled["seconds"]["m"] == {"first_token": 1.2, "decode_per_token": pytest.approx(0.12)}
    assert pooled["per_process"] == [p["ratios"] for p in per_process]
    assert timing.pooled(per_process[:1]) is per_process[0]  # one process: its own summary


@pytest.mark.parametrize("name", ["vlsae-shift-hooks", "vlsae-shift-hooks-read",
                                  "vlsae-contrast-hooks"])
def test_the_hooks_diagnostics_time_a_mode_without_the_space_and_restore_it(name):
    from vlsae_hooks.realignment import Realigner

    bench = load_benchmark("decode_overhead")
    realign = Realigner.offset
    model, space, _ = bench.load_toy(None)
    inputs = bench.prompt_inputs(model, n_text=6)
    mode = name.split("-")[1]
    with torch.no_grad():
        measured = bench.measure(model, space, inputs, new_tokens=3, repeats=1, methods=(name,))
        assert set(measured["ratios"]) == {name}
        assert Realigner.offset is realign
        plain = model(**inputs).logits
        with sys.modules["decode_methods"].SETUPS[name](model, space):
            assert Realigner.offset is not realign
            steered = model(**inputs).logits
    assert Realigner.offset is realign
    if mode == "shift":  # a zero shift moves nothing
        assert torch.equal(steered, plain)
        return
    # contrast's branch is the plain states again: at the last position the cutoff's survivors
    # keep their logits (to the rounding of running both branches as one batch), the rest -inf
    plain, steered = plain[:, -1], steered[:, -1]
    cutoff = ContrastOptions().plausibility_cutoff  # what attach(mode="contrast") uses
    kept = plain >= plain.amax(-1, keepdim=True) + math.log(cutoff)
    assert 0 < kept.sum() < kept.numel()
    torch.testing.assert_close(steered[kept], plain[kept], rtol=0, atol=1e-5)
    assert torch.isneginf(steered[~kept]).all()


def test_the_read_diagnostic_reads_the_whole_concept_matrix_at_each_decoding_step(monkeypatch):
    bench = load_benchmark("decode_overhead")
    model, space, _ = bench.load_toy(None)
    inputs = bench.prompt_inputs(model, n_text=6)
    concepts_t = space.text_step_encoder().concepts_t
    products = []
    mm = torch.mm

    def noting_mm(a, b, *args, **kwargs):
        if (b.data_ptr(), b.shape) == (concepts_t.data_ptr(), concepts_t.shape):
            products.append(a.shape)
        return mm(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "mm", noting_mm)
    with torch.no_grad(), sys.modules["decode_methods"].SETUPS["vlsae-shift-hooks-read"](
            model, space):
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    # the prefill (its prompt's text mean) and each of the 3 decoding steps read C^T [d, h]
    # once, for the batch's one row
    assert products == [torch.Size([1, space.config.d_model])] * 4


@pytest.mark.parametrize(("name", "mode", "n_concepts"),
                         [("vlsae-shift-small-space", "shift", 256),
                          ("vlsae-contrast-small-space", "contrast", 256),
                          ("vlsae-shift-4096-concepts", "shift", 4096)])
def test_the_resized_space_diagnostics_steer_with_a_space_of_the_same_shape(name, mode,
                                                                            n_concepts):
    bench = load_benchmark("decode_overhead")
    methods = sys.modules["decode_methods"]
    model, _, _ = bench.load_toy(None)
    space = random_space(model, layer=1, n_concepts=1024, k=8)
    resized = methods.resized_space(model, space, n_concepts)
    assert resized.config.n_concepts == n_concepts != space.config.n_concepts
    assert (resized.config.layer, resized.config.k, resized.config.site,
            resized.config.has_aligner, resized.dtype) == (
        space.config.layer, space.config.k, space.config.site, space.config.has_aligner,
        space.dtype)
    inputs = bench.prompt_inputs(model, n_text=6)
    seen = []
    with torch.no_grad():
        plain = model(**inputs).logits
        with methods.SETUPS[name](model, space) as handle:
            seen.append((handle.mode, handle.space.config.n_concepts))
            steered = model(**inputs).logits
        assert torch.equal(model(**inputs).logits, plain)  # detached again
    assert seen == [(mode, n_concepts)]
    assert (steered - plain).abs().max() > 1e-4  # it steers: the last text positions move


@pytest.mark.skipif(not any(map(shutil.which, ("g++", "clang++", "c++"))),
                    reason="torch.compile on a CPU builds C++: no compiler on this machine")
@pytest.mark.parametrize("mode", ["shift", "contrast"])
def test_the_compiled_diagnostics_steer_as_their_mode_does_through_a_compiled_graph(mode):
    from torch._dynamo.utils import counters

    from vlsae_hooks import attach
    from vlsae_hooks.realignment import Realigner

    bench = load_benchmark("decode_overhead")
    realign = Realigner.offset
    model, space, _ = bench.load_toy(None)
    inputs = bench.prompt_inputs(model, n_text=6)
    greedy = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        plain = model.generate(**inputs, **greedy)
        with attach(model, space, mode=mode):
            eager = model.generate(**inputs, **greedy)
        torch._dynamo.reset()  # each test compiles its own graph, to count it
        captured = counters["stats"]["calls_captured"]
        with sys.modules["decode_methods"].SETUPS[f"vlsae-{mode}-compiled"](model, space):
            compiled = model.generate(**inputs, **greedy)
    assert Realigner.offset is realign
    assert counters["stats"]["calls_captured"] > captured  # dynamo traced the realignment
    assert torch.equal(compiled.sequences, eager.sequences)
    for steered, fused, unsteered in zip(eager.logits, compiled.logits, plain.logits):
        torch.testing.assert_close(fused, steered, rtol=0, atol=1e-4)
        assert not torch.allclose(steered, unsteered)  # it steers every step


@pytest.mark.parametrize(("flags", "message"), [
    (["--toy-repeats", "0"], "argument --toy-repeats: must be at least 1, got 0"),  # was: 3
    (["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),  # repeats, silently
    (["--toy-tokens", "1"], "--toy-tokens must be at least 2: a decode step is timed after"),
    (["--processes", "0"], "argument --processes: must be at least 1, got 0"),
    (["--processes", "2", "--device", "cuda"], "cannot use the parent's CUDA context"),
])
def test_counts_that_cannot_be_timed_are_refused_before_any_work(monkeypatch, capsys, tmp_path,
                                                                  flags, message):
    benchmark = load_benchmark("decode_overhead")
    monkeypatch.setattr(sys, "argv", ["decode_overhead.py", "--json", str(tmp_path / "x.json"),
                                      *flags])
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
