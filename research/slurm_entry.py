"""The first of our code a Slurm task runs, kept free of heavy imports.

Slurm may send the ``--signal`` warning up to a minute before the time it was asked for (its event
resolution), so with a short limit it can arrive while the task is still importing torch, whose
default action for USR1 is to die. ``SlurmEntry`` starts holding the signal the moment it is
unpickled in the task, before the arguments (and the modules they need) are loaded; the requeue
handler (``research.preemption.install``) takes over later and honours a signal held until then.
"""

from __future__ import annotations

import importlib
import signal
from typing import Any

_held = False


def _hold(signum: int, frame: Any) -> None:
    global _held
    _held = True


def hold(signal_name: str) -> None:
    signum = getattr(signal, f"SIG{signal_name}", None)
    if isinstance(signum, signal.Signals):  # a bad name is reported by preemption.install
        signal.signal(signum, _hold)


def held() -> bool:
    """Whether the signal came before the requeue handler was installed."""
    return _held


class SlurmEntry:
    """Calls ``target`` ("module:function") with the task's arguments, holding ``signal_name``
    from the moment this object is unpickled."""

    def __init__(self, target: str, signal_name: str):
        self.target, self.signal_name = target, signal_name

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        hold(self.signal_name)

    def __call__(self, *args: Any) -> Any:
        hold(self.signal_name)
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)(*args)
