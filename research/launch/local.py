"""Jobs as processes on this machine: ``slots`` at a time, each slot pinned to its GPU if given.

Each job is ``python -m research.launch.local JOB.pkl`` with its output in ``RUN_DIR/log.txt``: a
crash, an out-of-memory kill or a NaN in one never stops the others, and each job's peak memory is
its own. ``submit`` only queues; ``wait`` runs the queue, with a progress bar.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from research.launch import COMPLETED, Submitted, Task
from research.launch.entry import call


class LocalLauncher:
    name = "local"

    def __init__(self, profile: DictConfig | None = None, jobs: int = 1, gpus: list[str] | None = None):
        self.slots: list[str | None] = list(gpus) if gpus else [None] * max(1, jobs)
        self.queued: dict[str, list[str]] = {}  # job id -> its command line
        self.states: dict[str, str] = {}

    def run_overrides(self) -> list[str]:
        return []  # a run takes the devices its own config names

    def submit(self, task: Task, folder: Path) -> list[Submitted]:
        folder.mkdir(parents=True, exist_ok=True)
        submitted = []
        for i, (args, label, run_dir) in enumerate(zip(task.calls, task.labels, task.run_dirs, strict=True)):
            job_id = f"{task.name}-{len(self.queued)}"
            job_file = folder / f"{job_id}.pkl"
            job_file.write_bytes(pickle.dumps((task.entry, tuple(args))))
            self.queued[job_id] = [sys.executable, "-m", __name__, str(job_file)]
            self.states[job_id] = "PENDING"
            submitted.append(Submitted(i, label, job_id, run_dir, str(Path(run_dir) / "log.txt")))
        return submitted

    def wait(self, jobs: list[Submitted]) -> dict[str, str]:
        threads = max(1, (os.cpu_count() or 1) // len(self.slots))
        queue = [j for j in jobs if self.states[j.job_id] == "PENDING"]
        running: dict[int, tuple[subprocess.Popen, Any, Submitted]] = {}  # slot -> process, log, job
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[counts]}"), TimeElapsedColumn())  # fmt: skip
        with Progress(*columns) as progress:
            bar = progress.add_task(jobs[0].job_id.rsplit("-", 1)[0] if jobs else "jobs", total=len(queue),
                                    counts="")  # fmt: skip
            while queue or running:
                for slot, gpu in enumerate(self.slots):
                    if slot not in running and queue:
                        job = queue.pop(0)
                        running[slot] = (*self._start(job, gpu, threads), job)
                for slot, (proc, log, job) in list(running.items()):
                    if proc.poll() is not None:
                        log.close()
                        self.states[job.job_id] = COMPLETED if proc.returncode == 0 else \
                            f"FAILED (exit code {proc.returncode})"  # fmt: skip
                        del running[slot]
                        progress.advance(bar)
                states = [self.states[j.job_id] for j in jobs]
                failed = sum(s.startswith("FAILED") for s in states)
                progress.update(bar, counts=f"done {states.count(COMPLETED)}  failed {failed}  "
                                            f"left {len(queue) + len(running)}")  # fmt: skip
                time.sleep(0.2)
        return {j.job_id: self.states[j.job_id] for j in jobs}

    def _start(self, job: Submitted, gpu: str | None, threads: int) -> tuple[subprocess.Popen, Any]:
        Path(job.run_dir).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        env.pop("SUBMITIT_EXECUTOR", None)  # a local job is not the Slurm job this may run in
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        log = open(job.log, "a")  # noqa: SIM115  (closed with the process)
        self.states[job.job_id] = "RUNNING"
        return subprocess.Popen(self.queued[job.job_id], stdout=log, stderr=subprocess.STDOUT, env=env), log

    def status(self, job_ids: list[str]) -> dict[str, str]:
        return {j: self.states.get(j, "UNKNOWN") for j in job_ids}

    def requeue(self) -> None:
        raise RuntimeError("a local job cannot be requeued: run the same command again to resume it")


LAUNCHER = LocalLauncher

if __name__ == "__main__":  # one job: its function and arguments, pickled by submit
    entry, args = pickle.loads(Path(sys.argv[1]).read_bytes())
    call(entry, *args)
