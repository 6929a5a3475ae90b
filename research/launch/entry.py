"""The first of our code a job runs, kept free of heavy imports.

``TaskEntry`` starts holding the requeue signal the moment it is unpickled in the job, before the
arguments (and the modules they need) are loaded (``research.signals`` says why), then imports
the task's function by name and calls it.
"""

from __future__ import annotations

import importlib
from typing import Any

from research import signals


def call(entry: str, *args: Any) -> Any:
    """Call ``entry`` ("module:function") with ``args``."""
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)(*args)


class TaskEntry:
    """Calls ``entry`` with the job's arguments, holding ``signal_name`` from the moment this
    object is unpickled."""

    def __init__(self, entry: str, signal_name: str):
        self.entry, self.signal_name = entry, signal_name

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        signals.hold(self.signal_name)

    def __call__(self, *args: Any) -> Any:
        signals.hold(self.signal_name)
        return call(self.entry, *args)
