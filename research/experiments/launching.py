"""Sending a grid's runs or a sweep's workers out: one path for both, whatever the launcher."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig

from research.launch import Launcher, Submitted, Task, write_record


def launch(cfg: DictConfig, launcher: Launcher, task: Task, folder: Path, kind: str, name: str,
           wait: bool, then: Task | None = None) -> list[tuple[Submitted, str]] | None:  # fmt: skip
    """Submit ``task`` (and ``then``, to start once every job of it ended); on a scheduler, record
    the jobs for ``lab status NAME``. With ``wait``, each of the task's jobs with its final state,
    in the task's order; else None once they are queued."""
    folder.mkdir(parents=True, exist_ok=True)
    submitted = launcher.submit(task, folder)
    if then is not None:
        then.after = [s.job_id for s in submitted]
        later = launcher.submit(then, folder)
        submitted += [replace(s, index=len(submitted) + i) for i, s in enumerate(later)]
    if launcher.name != "local":  # local jobs end with this process: nothing to look up later
        record = write_record(folder, kind, name, launcher.name, cfg.cluster.name, submitted)
        print(f"submitted {len(submitted)} job(s) as '{task.name}' on '{cfg.cluster.name}' "
              f"({cfg.cluster.get('array_parallelism', 1)} at a time); record {record}; "
              f"see `lab status {name}`")  # fmt: skip
    if not wait:
        return None
    states = launcher.wait(submitted)
    return [(s, states.get(s.job_id, "UNKNOWN")) for s in submitted[: len(task.calls)]]
