"""Plain helper functions the tests call with arguments (data writers, small configs, spaces).

Fixtures built once live in the ``conftest.py`` files; these are importable as ``helpers.*``
because pytest puts ``tests/`` on ``sys.path`` (``pythonpath`` in ``pyproject.toml``).
"""
