"""One process trains a run folder at a time: ``owner.json`` in it names who does.

A grid whose parent was killed leaves its runs training; relaunched at once, it would start a
second process on the same folder, MLflow run and checkpoints. A run folder therefore has an owner
(host, pid, and the MLflow run once there is one). A live owner on this host blocks a second
claim; a dead one is taken over, and the run it recorded, if nobody resumes it, is closed as KILLED.

An owner on another host cannot be checked from here: it is taken to be dead (a requeued Slurm
job starts on whichever node is free, and its earlier attempt has ended by then).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

OWNER_FILE = "owner.json"


class RunFolderBusy(ValueError):
    """Another live process trains this run folder."""


@dataclass
class Owner:
    host: str
    pid: int
    run_id: str | None = None

    def alive(self) -> bool:
        """On this host: the process exists and is not a zombie (an exited process whose parent
        has not yet reaped it still answers ``kill -0``)."""
        if self.host != socket.gethostname() or self.pid == os.getpid():
            return False
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            try:
                os.kill(self.pid, 0)  # no /proc (macOS): existence is all we can tell
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        return "\nState:\tZ" not in status


def owner_of(run_dir: Path) -> Owner | None:
    try:
        return Owner(**json.loads((Path(run_dir) / OWNER_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def busy_message(run_dir: Path, owner: Owner) -> str:
    return (f"run folder {run_dir} is being trained by pid {owner.pid} on {owner.host}: wait for it "
            f"to end or stop it, then run again")  # fmt: skip


def claim_folder(run_dir: Path) -> Owner | None:
    """Become ``run_dir``'s owner; return the previous (dead) owner, if there was one.
    Raises ``RunFolderBusy`` while that owner still runs."""
    run_dir = Path(run_dir)
    previous = owner_of(run_dir)
    if previous is not None and previous.alive():
        raise RunFolderBusy(busy_message(run_dir, previous))
    run_dir.mkdir(parents=True, exist_ok=True)
    _write(run_dir, Owner(socket.gethostname(), os.getpid()))
    return previous


def record_run(run_dir: Path, run_id: str) -> None:
    """The MLflow run this owner trains, so whoever takes over after a kill can close it."""
    _write(Path(run_dir), Owner(socket.gethostname(), os.getpid(), run_id))


@contextmanager
def owned(run_dir: Path, claim: bool = True) -> Iterator[Owner | None]:
    """Own ``run_dir`` for the block (``claim``: False in a run's other ranks); yields the previous
    owner, dead, if there was one."""
    previous = claim_folder(run_dir) if claim else None
    try:
        yield previous
    finally:
        if claim:
            release(run_dir)


def release(run_dir: Path) -> None:
    owner = owner_of(run_dir)
    if owner is not None and owner.host == socket.gethostname() and owner.pid == os.getpid():
        (Path(run_dir) / OWNER_FILE).unlink(missing_ok=True)


def _write(run_dir: Path, owner: Owner) -> None:
    tmp = run_dir / f".{OWNER_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(asdict(owner)))
    tmp.replace(run_dir / OWNER_FILE)  # atomic: a reader never sees half a file
