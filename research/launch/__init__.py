"""Where runs execute. A ``Launcher`` sends a ``Task`` out as jobs, waits for them, says what state
each is in, and requeues the job it runs in; ``cluster.launcher`` picks one (``local`` or ``slurm``).

A launcher is a module of this package named as ``cluster.launcher`` names it, holding a
``LAUNCHER`` class: adding a backend is that module and a profile under ``cluster/``. A task names
its function by string ("module:function", imported in the job), so this layer never imports the
layers that define the work. Every submission leaves ``jobs.json`` beside its runs for
``lab status``.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

from components.registry import require

COMPLETED = "COMPLETED"  # a job's state once it ended well; any other final state is a failure


@dataclass
class Task:
    """One function called once per job: ``calls[i]`` are job i's arguments."""

    entry: str  # "module:function"
    calls: list[tuple]
    labels: list[str]  # what each job is, for people: "ARM seed=N", "worker 0: 3 trials"
    run_dirs: list[str]
    name: str  # the jobs' name in the scheduler
    signal: str  # trainer.requeue_signal: the warning a job gets before it is stopped
    after: list[str] = field(default_factory=list)  # job ids that must have ended first
    resources: dict[str, Any] = field(default_factory=dict)  # profile keys this task overrides


@dataclass
class Submitted:
    index: int
    label: str  # the arm and seed, or the sweep worker
    job_id: str  # the launcher's, e.g. Slurm's 1234_0 for an array task
    run_dir: str
    log: str  # its stdout file (stderr beside it)


class Launcher(Protocol):
    name: str

    def run_overrides(self) -> list[str]:
        """What a run needs to fit one job's allocation (e.g. its devices and nodes)."""

    def submit(self, task: Task, folder: Path) -> list[Submitted]:
        """Send the task's jobs out (their scheduler files under ``folder``)."""

    def wait(self, jobs: list[Submitted]) -> dict[str, str]:
        """Block until every job ended; each job's final state (``COMPLETED`` when it went well)."""

    def status(self, job_ids: list[str]) -> dict[str, str]:
        """Each job's state now, as far as the launcher knows it."""

    def requeue(self) -> None:
        """From inside a job: put it back in the queue, to start again from its checkpoint."""


def launcher_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "entry")


def launcher_name(cfg: DictConfig) -> str:
    name = (cfg.get("cluster") or {}).get("launcher", "local")
    require(name in launcher_names(), "cluster.launcher", name, ", ".join(launcher_names()))
    return name


def get_launcher(cfg: DictConfig, **options: Any) -> Launcher:
    """The launcher of ``cfg.cluster``; ``options`` (a local grid's ``jobs``, ``gpus``) go to it."""
    return launcher_named(launcher_name(cfg), cfg.cluster, **options)


def launcher_named(name: str, profile: DictConfig | None = None, **options: Any) -> Launcher:
    return importlib.import_module(f"{__name__}.{name}").LAUNCHER(profile, **options)


def write_record(
    folder: Path, kind: str, name: str, launcher: str, profile: str, jobs: list[Submitted]
) -> Path:
    path = folder / "jobs.json"
    record = {"kind": kind, "name": name, "launcher": launcher, "profile": profile,
              "submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "jobs": [asdict(j) for j in jobs]}  # fmt: skip
    path.write_text(json.dumps(record, indent=2))
    return path


def find_records(name: str) -> list[Path]:
    """Submissions of grid or sweep ``name``, newest last."""
    found = [*Path("multirun", name).glob("*/jobs.json"), *Path("sweeps_out", name).glob("*/jobs.json")]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def current_records(name: str) -> list[dict[str, Any]]:
    """What ``lab status NAME`` shows: a grid's or sweep's newest submission (a relaunch submits
    what is left of the same runs), or every ``lab train cluster=...`` submission of ablation
    ``name`` (each its own run), oldest first."""
    records = [json.loads(p.read_text()) for p in find_records(name)]
    require(bool(records), "name", name, "a grid or sweep submitted to Slurm (no multirun/NAME/*/jobs.json)")
    if records[-1]["kind"] == "run":
        return [r for r in records if r["kind"] == "run"]
    return records[-1:]
