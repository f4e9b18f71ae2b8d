"""Recording the calls a module makes to some of its own names (which data a fit draws)."""

from __future__ import annotations

from types import ModuleType


def record_calls(monkeypatch, module: ModuleType, *names: str) -> list[tuple[str, tuple]]:
    """Wrap ``module``'s ``names`` so that each call is noted, as (name, positional args) in call
    order, in the returned list, then made as before."""
    calls: list[tuple[str, tuple]] = []
    for name in names:
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, args))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls
