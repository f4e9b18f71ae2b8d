"""The timing harness of ``decode_overhead.py``: one greedy generate timed step by step, the
paired ratios to plain, and the interleaved loops, in one process (``measure``) or over two
source trees side by side (``measure_side_by_side``).

Side by side: the model is built once, here, and two worker processes are forked from this one
(sharing its weights, copy-on-write), each with one tree's ``vlsae_hooks`` and ``eval_suites``
imported afresh (the tree first on ``sys.path``) and its own space. Every repeat times plain and
each method in both workers, one after the other, the order alternating, so the two trees see
the same machine state; each tree's ratios pair its methods with its own plain of the same
repeat, and ``current / baseline`` pairs the two trees' seconds of the same repeat.
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


def generate_seconds(model, inputs: dict, new_tokens: int,
                     clock=time.perf_counter) -> tuple[float, float]:
    """(seconds to the first token, i.e. prefill + 1 token, median seconds of a decode step
    after it) of one greedy generate; ``new_tokens`` >= 2. The KV cache is generate's default
    (on), so ``vlsae-reference`` can turn it off."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to time a decode step, got {new_tokens}")
    synchronize = torch.cuda.synchronize if inputs["input_ids"].device.type == "cuda" else None
    if synchronize is not None:  # the GPU work queued before (attach's) is not this call's
        synchronize()
    step_clock = StepClock(clock, synchronize)
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, stopping_criteria=StoppingCriteriaList([step_clock]))
    times = step_clock.times
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
                         clock: str = "wall") -> dict:
    """Time ``methods`` and plain in one worker per tree (``trees``: name -> source folder),
    interleaved. ``make_space(decode_models, model)`` -> (space, description) runs in each
    worker with its tree's code. Returns per tree ``summary`` and "ready" (what it steered
    with), and "current_vs_baseline" (per method, median over repeats of the second tree's
    seconds over the first's: one token, per decode step)."""
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
        names = ["plain", *(m for m in methods if m != "plain")]
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
        result = {}
        for tree in trees:
            timed = {m: v for m, v in runs[tree].items() if len(v) == repeats}
            result[tree] = {**summary(timed), "ready": ready[tree], "errors": errors[tree]}
        first, second = order
        result["current_vs_baseline"] = {
            m: {"one_token": statistics.median(b[0] / a[0] for a, b in
                                               zip(runs[first][m], runs[second][m])),
                "decode_step": statistics.median(b[1] / a[1] for a, b in
                                                 zip(runs[first][m], runs[second][m]))}
            for m in names if len(runs[first][m]) == len(runs[second][m]) == repeats}
        return result
    finally:
        for conn, process in workers.values():
            if process.is_alive():
                conn.send(("stop",))
                process.join(timeout=60)
