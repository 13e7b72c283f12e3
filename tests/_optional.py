"""Optional test peers (flwr), imported inside the tests that use them.

``flwr = OptionalModule("flwr.common")`` at the top of a test file costs nothing at collection;
the first attribute a test reads imports the module with ``pytest.importorskip``, so without
flwr each test that needs it is skipped with the reason while the file's other tests still run.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest


class OptionalModule:
    """A module imported on first attribute use, skipping the calling test if it is absent.

    >>> math = OptionalModule("math")
    >>> math.sqrt(4.0)
    2.0
    """

    def __init__(self, name: str, reason: str | None = None) -> None:
        self._name = name
        self._reason = reason
        self._module: Any = None

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # copy/pickle/inspect probes: not an import
            raise AttributeError(attr)
        if self._module is None:
            top = self._name.split(".")[0]
            pytest.importorskip(top, reason=self._reason and f"no {top}: {self._reason}")
            # the package is there: a missing submodule (another version's layout) skips too
            pytest.importorskip(self._name, reason=self._reason)
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


class OptionalNames:
    """A read-only mapping of names to attributes of an OptionalModule, looked up on use."""

    def __init__(self, module: OptionalModule, names: dict) -> None:
        self._module, self._names = module, names

    def __getitem__(self, key: str) -> Any:
        return getattr(self._module, self._names[key])

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
