"""Fixtures shared by every test package, and the check that keeps them shareable.

Objects built once (tiny models, spaces, input batches, model folders) are handed to many tests,
so every test must leave them as it found them: hooks taken off, no steering handle left behind,
weights, configs and tensors unchanged, no file added to or changed in a shared folder. The
autouse fixture below compares each shared object a test uses before and after it runs.
Fixtures that tests change on purpose are built per test instead (``tiny_llava()`` inline).

Under ``pytest -n`` (README's test command) each worker keeps to one torch thread, before and
after every test: the workers share the cores, and more threads than cores make torch's threads
wait on each other (several times slower on two cores).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from vlsae_hooks.testing import tiny_clip, tiny_llava

SHARED = ("tiny_llava_model", "tiny_clip_model", "space", "spaces", "rows", "pixels", "batch",
          "llava", "llava_dir", "activations", "straight", "toy_llava", "toy_llava_dir",
          "protocol_data", "protocol_model_dir", "shipped_toy_llava")
"""Names of the fixtures built once per session or module that tests only read."""

WORKER = "PYTEST_XDIST_WORKER" in os.environ
"""Whether this process is one of ``pytest -n``'s workers."""
if WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"  # and the commands a test runs
    torch.set_num_threads(1)

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_load_state_dict_pre_hooks")
_CAPTURING = "transformers.utils.output_capturing"
"""transformers installs its output-capturing hooks (and a flag saying so) on a model's first
forward that needs them and keeps them: not a change a test made."""


def _module_state(module: nn.Module) -> dict:
    hooks = sum(getattr(f, "__module__", None) != _CAPTURING
                for d in _HOOK_DICTS for f in getattr(module, d, {}).values())
    attributes = set(vars(module)) - {"_output_capturing_hooks_installed"}
    return {"training": module.training, "hooks": hooks, "attributes": attributes}


def fingerprint(value):
    """What a test could change in ``value``, in a form ``changes`` can compare."""
    if isinstance(value, nn.Module):
        return {"state": {k: v.detach().clone() for k, v in value.state_dict().items()},
                "modules": {name: _module_state(m) for name, m in value.named_modules()},
                "config": _config_of(value, "config"),
                "generation_config": _config_of(value, "generation_config")}
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: fingerprint(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [fingerprint(v) for v in value]
    if isinstance(value, Path) and value.is_dir():  # files with their sizes and times
        return [(str(p.relative_to(value)), *((p.stat().st_size, p.stat().st_mtime_ns)
                                              if p.is_file() else ()))
                for p in sorted(value.rglob("*"))]
    if isinstance(value, (int, float, str, bool, Path)) or value is None:
        return value
    return None  # processors: not checked


def _config_of(module: nn.Module, name: str):
    config = getattr(module, name, None)
    if hasattr(config, "to_json_string"):  # a transformers config
        return config.to_json_string(use_diff=False) + repr(getattr(config, "_name_or_path", ""))
    return repr(config)  # a concept space's SpaceConfig (a dataclass), or None


def changes(before, after, where: str = "") -> list[str]:
    """Where ``after`` (a fingerprint) differs from ``before``, for the failure message."""
    if isinstance(before, dict) and isinstance(after, dict) and before.keys() == after.keys():
        return [c for k in before for c in changes(before[k], after[k], f"{where}[{k!r}]")]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [c for i, (x, y) in enumerate(zip(before, after))
                for c in changes(x, y, f"{where}[{i}]")]
    if isinstance(before, torch.Tensor):
        unchanged = isinstance(after, torch.Tensor) and before.shape == after.shape and \
            before.dtype == after.dtype and torch.equal(before, after)
        return [] if unchanged else [f"{where}: tensor changed"]
    if isinstance(before, set) and isinstance(after, set) and before != after:
        return [f"{where}: added {sorted(after - before)}, removed {sorted(before - after)}"]
    return [] if before == after else [f"{where}: {repr(before)[:160]} -> {repr(after)[:160]}"]


@pytest.fixture(autouse=True)
def _shared_fixtures_left_as_found(request):
    """Fail a test that leaves a shared fixture changed (see the module docstring)."""
    shared = {name: request.getfixturevalue(name) for name in SHARED
              if name in request.fixturenames}
    before = {name: fingerprint(value) for name, value in shared.items()}
    yield
    for name, value in shared.items():
        found = changes(before[name], fingerprint(value))
        assert not found, f"the test changed the shared fixture {name!r}: {found[:5]}"


@pytest.fixture(autouse=True)
def _one_thread_per_worker():
    """A command run in-process (a toy world's training) sets its own threads: back to one."""
    yield
    if WORKER and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llava_model():
    """``tiny_llava()`` (seed 0): LLaVA-1.5 layout, 4 decoder layers 64 wide, 16 image tokens."""
    return tiny_llava()


@pytest.fixture(scope="session")
def tiny_clip_model():
    """``tiny_clip()`` (seed 0): 64-wide towers and projections; ``tiny_processor`` fits it."""
    return tiny_clip()
