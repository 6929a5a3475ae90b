"""The one requeue flag: set by Slurm's warning signal, read at the next step boundary.

Slurm may send the ``--signal`` warning up to a minute before the time it was asked for (its event
resolution), so with a short limit it can arrive while the task is still importing torch, whose
default action for USR1 is to die. ``hold`` catches it from the task's first line of our code
(``research.launch.entry``); ``install`` is the same handler, with the name checked, once the
config is known. Either way the signal only sets the flag: the trainer checkpoints at a step
boundary, never inside the handler.
"""

from __future__ import annotations

import signal
from typing import Any

from components.registry import require

_requested = False


def _raise_flag(signum: int, frame: Any) -> None:
    global _requested
    _requested = True


def hold(name: str) -> None:
    """Catch ``SIG<name>`` before anything is known; a bad name is left to ``install`` to report."""
    signum = getattr(signal, f"SIG{name}", None)
    if isinstance(signum, signal.Signals):
        signal.signal(signum, _raise_flag)


def install(name: str) -> None:
    """Catch ``SIG<name>`` from now on (call early: its default action kills the process). A
    signal that came while it was only held stays requested."""
    signum = getattr(signal, f"SIG{name}", None)
    require(isinstance(signum, signal.Signals), "trainer.requeue_signal", name, "USR1, USR2, TERM, ...")
    signal.signal(signum, _raise_flag)


def requested() -> bool:
    return _requested
