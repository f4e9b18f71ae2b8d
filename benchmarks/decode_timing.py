"""The timing harness of ``decode_overhead.py``: one greedy generate timed step by step, the
paired ratios to plain, and the interleaved loops, in one process (``measure``) or over two
source trees side by side (``measure_side_by_side``).

Side by side: the model is built once, here, and two worker processes are forked from this one
(sharing its weights, copy-on-write), each with one tree's ``vlsae_hooks`` and ``eval_suites``
imported afresh (the tree first on ``sys.path``) and its own space. Every repeat times plain and
each method in both workers, one after the other, the order alternating, so the two trees see
the same machine state; each tree's ratios pair its methods with its own plain of the same
repeat, and ``current / baseline`` pairs the two trees' seconds of the same repeat. The same
loop runs with one tree too, and either way ``processes`` rounds one after another, each in
fresh workers: on a CPU a toy ratio moves by up to 10 points from one process to the next (the
cause was not measured), so one process's ratio is one draw, and several give a median and a
range. (Rounds, not more workers at once: nine workers interleaved made every mode cost 5-10
points more than rounds of two do, plain's step being the faster there; the workers share the
model's weights but each reads its own space, a likely cause, not measured.)
"""

from __future__ import annotations

import importlib
import multiprocessing
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

CAPTION_TOKENS = 512
"""Length of the caption of ratio (b)."""
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
"""wall: elapsed time; cpu: this thread's CPU time, which other processes on a shared machine
disturb far less (on the CPU only: it misses a GPU's work, and the work of torch's other threads,
so the scripts that use it run torch on one thread)."""


class StepClock(StoppingCriteria):
    """Never stops generation; notes the time at the end of every step (on a GPU once the
    step's kernels have finished: ``synchronize``)."""

    def __init__(self, clock=time.perf_counter, synchronize=None) -> None:
        self.clock, self.synchronize = clock, synchronize
        self.times = [clock()]

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self.synchronize is not None:
            self.synchronize()
        self.times.append(self.clock())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def step_times(model, inputs: dict, new_tokens: int, clock=time.perf_counter,
               synchronize=None) -> list:
    """The ``clock``'s readings around one greedy generate: before it, then at the end of every
    new token's step (``StepClock``); ``new_tokens`` >= 2, so that a decode step follows the
    first token. The KV cache is generate's default (on), so ``vlsae-reference`` can turn it
    off."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to time a decode step, got {new_tokens}")
    step_clock = StepClock(clock, synchronize)
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, stopping_criteria=StoppingCriteriaList([step_clock]))
    return step_clock.times


def generate_seconds(model, inputs: dict, new_tokens: int,
                     clock=time.perf_counter) -> tuple[float, float]:
    """(seconds to the first token, i.e. prefill + 1 token, median seconds of a decode step
    after it) of one greedy generate (``step_times``)."""
    synchronize = torch.cuda.synchronize if inputs["input_ids"].device.type == "cuda" else None
    if synchronize is not None:  # the GPU work queued before (attach's) is not this call's
        synchronize()
    times = step_times(model, inputs, new_tokens, clock, synchronize)
    steps = [b - a for a, b in zip(times[1:], times[2:])]
    return times[1] - times[0], statistics.median(steps)


def end_to_end(first_token: float, per_token: float, tokens: int) -> float:
    """Seconds to generate ``tokens`` tokens: the first (prefill) then ``tokens - 1`` steps."""
    return first_token + (tokens - 1) * per_token


def paired_ratios(runs: list[tuple[float, float]], plain: list[tuple[float, float]],
                  caption_tokens: int = CAPTION_TOKENS) -> dict[str, float]:
    """Medians over repeats of method / plain (same repeat) for (a) a one-token answer and
    (b) a ``caption_tokens``-token caption; runs are (first-token, per-token) seconds."""
    one = [m[0] / p[0] for m, p in zip(runs, plain)]
    caption = [end_to_end(*m, caption_tokens) / end_to_end(*p, caption_tokens)
               for m, p in zip(runs, plain)]
    return {"one_token": statistics.median(one), "caption": statistics.median(caption)}


def summary(runs: dict[str, list[tuple[float, float]]]) -> dict:
    """{"ratios": per method but plain its paired ratios to plain, "seconds": per method the
    median first-token and per-token seconds}."""
    ratios = {name: paired_ratios(values, runs["plain"])
              for name, values in runs.items() if name != "plain"}
    seconds = {name: {"first_token": statistics.median(r[0] for r in values),
                      "decode_per_token": statistics.median(r[1] for r in values)}
               for name, values in runs.items()}
    return {"ratios": ratios, "seconds": seconds}


def measure(model, space, inputs: dict, new_tokens: int, repeats: int,
            methods: tuple[str, ...] | None = None, clock: str = "wall") -> dict:
    """Interleave plain and ``methods`` (default: all) in this process: ``summary`` of them."""
    from decode_methods import METHODS, SETUPS

    names = ["plain", *(name for name in (methods or METHODS) if name != "plain")]
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for name in names:  # warm-up: lazy set-up, allocator growth, first-call paths
        with SETUPS[name](model, space):
            generate_seconds(model, inputs, 2)
    for _ in range(repeats):
        for name in names:
            with SETUPS[name](model, space):
                runs[name].append(generate_seconds(model, inputs, new_tokens, CLOCKS[clock]))
    return summary(runs)


# -- two source trees side by side -------------------------------------------------------------
FRESH = ("vlsae_hooks", "eval_suites", "sae_training", "decode_methods", "decode_models")
"""Packages a worker imports from its own tree (dropped from the forked ``sys.modules``)."""


def use_tree(src: Path) -> None:
    """Import ``FRESH`` from ``src`` from now on in this process."""
    for name in list(sys.modules):
        if name.split(".")[0] in FRESH:
            del sys.modules[name]
    sys.path.insert(0, str(src))
    sys.path.insert(1, str(Path(__file__).parent))  # decode_methods and _models: this script's
    importlib.invalidate_caches()
    import vlsae_hooks

    if not Path(vlsae_hooks.__file__).resolve().is_relative_to(src.resolve()):
        raise RuntimeError(f"{src} did not provide vlsae_hooks (got {vlsae_hooks.__file__})")


def _worker(conn, inherited: list, src: Path, model, make_space, inputs: dict,
            clock: str) -> None:
    """One tree's timing loop: answers ("time", method, new_tokens) with (first, per_token)
    seconds, or an error in words; ("stop",) or the parent's end closing (it died) ends it."""
    for end in inherited:  # the parent's ends, forked along: the parent's death must close them
        end.close()
    try:
        torch.set_num_threads(1)
        use_tree(src)
        import decode_methods
        import decode_models

        from vlsae_hooks.attach import space_steering

        with torch.no_grad():
            space, description = make_space(decode_models, model)
            try:
                steering = space_steering(space)
            except ValueError as error:  # e.g. a mode this tree does not know: vlsae fails
                steering = {"error": str(error)}
            conn.send({"ready": description, "steering": steering,
                       "vlsae_hooks": sys.modules["vlsae_hooks"].__file__})
            warm = set()
            while True:
                try:
                    message = conn.recv()
                except EOFError:  # the parent is gone
                    return
                if message[0] == "stop":
                    return
                _, name, new_tokens = message
                try:
                    if name not in warm:  # under its own attach, as ``measure`` warms up: every
                        with decode_methods.SETUPS[name](model, space):  # timed generate is
                            generate_seconds(model, inputs, 2)  # the first after an attach
                        warm.add(name)
                    with decode_methods.SETUPS[name](model, space):
                        conn.send(generate_seconds(model, inputs, new_tokens, CLOCKS[clock]))
                except Exception as error:  # noqa: BLE001 - reported per method
                    conn.send({"error": f"{type(error).__name__}: {error}"})
    except Exception:  # noqa: BLE001 - the parent reports it
        conn.send({"failed": traceback.format_exc()})


def measure_side_by_side(trees: dict[str, Path], model, make_space, inputs: dict,
                         new_tokens: int, repeats: int, methods: tuple[str, ...],
                         clock: str = "wall", processes: int = 1) -> dict:
    """Time ``methods`` and plain in one worker per tree (``trees``: name -> source folder; one
    tree is allowed), interleaved; ``processes`` times over, one round after another, each with
    fresh workers. ``make_space(decode_models, model)`` -> (space, description) runs in each
    worker with its tree's code. Returns per tree ``summary`` pooled over its processes
    (``pooled``), "ready" (what it steered with) and "errors"; and with two trees
    "current_vs_baseline" (per method, median over repeats and rounds of the second tree's
    seconds over the first's: one token, per decode step)."""
    names = ["plain", *(m for m in methods if m != "plain")]
    rounds = [_round(trees, model, make_space, inputs, new_tokens, repeats, names, clock)
              for _ in range(processes)]
    timed = {tree: [m for m in names if all(len(r["runs"][tree][m]) == repeats for r in rounds)]
             for tree in trees}  # a method that failed in a round is left out of its tree's
    result = {}
    for tree in trees:
        per_process = [summary({m: r["runs"][tree][m] for m in timed[tree]}) for r in rounds]
        result[tree] = {**pooled(per_process), "ready": rounds[0]["ready"][tree],
                        "errors": {m: e for r in rounds for m, e in r["errors"][tree].items()}}
    if len(trees) == 2:
        first, second = trees
        result["current_vs_baseline"] = {
            m: {what: statistics.median(b[at] / a[at] for r in rounds
                                        for a, b in zip(r["runs"][first][m], r["runs"][second][m]))
                for what, at in (("one_token", 0), ("decode_step", 1))}
            for m in timed[first] if m in timed[second]}
    return result


def _round(trees: dict[str, Path], model, make_space, inputs: dict, new_tokens: int,
           repeats: int, names: list[str], clock: str) -> dict:
    """One worker per tree, forked, timing ``names`` repeat by repeat, the trees' order
    alternating: {"runs": tree -> method -> [(first, per_token)], "ready", "errors"}."""
    context = multiprocessing.get_context("fork")  # the workers share the model's weights
    workers = {}
    for name, src in trees.items():
        parent, child = context.Pipe()
        inherited = [parent, *(conn for conn, _ in workers.values())]
        process = context.Process(target=_worker, daemon=True,
                                  args=(child, inherited, src, model, make_space, inputs, clock))
        process.start()
        child.close()
        workers[name] = (parent, process)
    ready = {}
    try:
        for name, (conn, _) in workers.items():
            ready[name] = conn.recv()
            if "failed" in ready[name]:
                raise RuntimeError(f"the {name} tree's worker failed:\n{ready[name]['failed']}")
        runs = {tree: {m: [] for m in names} for tree in trees}
        errors: dict[str, dict[str, str]] = {tree: {} for tree in trees}
        order = list(trees)
        for repeat in range(repeats):
            for i, method in enumerate(names):
                for tree in (order if (repeat + i) % 2 == 0 else order[::-1]):
                    conn = workers[tree][0]
                    conn.send(("time", method, new_tokens))
                    answer = conn.recv()
                    if isinstance(answer, dict):
                        errors[tree][method] = answer["error"]
                    else:
                        runs[tree][method].append(tuple(answer))
        return {"runs": runs, "ready": ready, "errors": errors}
    finally:
        for conn, process in workers.values():
            if process.is_alive():
                conn.send(("stop",))
                process.join(timeout=60)


def pooled(per_process: list[dict]) -> dict:
    """One tree's ``summary`` over its processes: each ratio and each seconds figure the median
    of the processes' own; with several processes, each method's ratios also hold "range", the
    lowest and highest process's (a toy ratio moves by several points from one process to the
    next), and "per_process" every process's ratios."""
    if len(per_process) == 1:
        return per_process[0]
    ratios = {
        m: {**{what: statistics.median(p["ratios"][m][what] for p in per_process)
               for what in ("one_token", "caption")},
            "range": {what: [min(p["ratios"][m][what] for p in per_process),
                             max(p["ratios"][m][what] for p in per_process)]
                      for what in ("one_token", "caption")}}
        for m in per_process[0]["ratios"]}
    seconds = {m: {what: statistics.median(p["seconds"][m][what] for p in per_process)
                   for what in ("first_token", "decode_per_token")}
               for m in per_process[0]["seconds"]}
    return {"ratios": ratios, "seconds": seconds,
            "per_process": [p["ratios"] for p in per_process]}
