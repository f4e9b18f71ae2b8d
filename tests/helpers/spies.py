"""Recording the calls a module makes to some of its own names (which data a fit draws, and
what it made of them)."""

from __future__ import annotations

import contextlib
from types import ModuleType


def record_calls(monkeypatch, module: ModuleType, *names: str) -> list[tuple[str, tuple]]:
    """Wrap ``module``'s ``names`` so that each call is noted, as (name, positional args) in call
    order, in the returned list, then made as before."""
    return _record(monkeypatch, module, names, results=False)


def record_results(monkeypatch, module: ModuleType,
                   *names: str) -> list[tuple[str, tuple, object]]:
    """``record_calls``, each call noted with what it returned: (name, positional args,
    result)."""
    return _record(monkeypatch, module, names, results=True)


def _record(monkeypatch, module: ModuleType, names: tuple[str, ...], results: bool) -> list:
    calls: list = []
    for name in names:
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            if not results:
                calls.append((_name, args))
                return _real(*args, **kwargs)
            result = _real(*args, **kwargs)
            calls.append((_name, args, result))
            return result

        monkeypatch.setattr(module, name, spy)
    return calls


def attach_calls(monkeypatch, method, model, processor) -> list[tuple[object, dict]]:
    """(space, options) of each ``vlsae_hooks.attach`` call that entering ``method`` makes (attach
    itself not run), and the decoder the method yields, as the last item."""
    import vlsae_hooks

    seen: list = []

    def spy(model, space=None, **options):
        seen.append((space, options))
        return contextlib.nullcontext()

    with monkeypatch.context() as patch:
        patch.setattr(vlsae_hooks, "attach", spy)
        with method(model, processor) as decoder:
            seen.append(decoder)
    return seen
