"""Grids and sweeps on Slurm, through submitit: a profile (``cluster=NAME``) becomes sbatch options.

A grid is one job array (``array_parallelism`` runs at a time), one array task per run; a sweep is
one array of N workers sharing the study's storage. Each task composes its run's config from the
same overrides ``lab train`` would get and calls ``train()`` in the Slurm task itself, so with
``gpus_per_node`` GPUs Slurm starts one task per GPU and Lightning reads the ranks from Slurm.
Time limits and preemption are handled by ``research.training.preemption`` (``--signal`` is set to
``trainer.requeue_signal``; submitit's own requeue is not used). Every submission writes
``jobs.json`` beside its runs for ``lab status``; submitit's files go to ``<grid>/slurm/`` and each
run's folder links its own log files as ``slurm.out`` and ``slurm.err``.

(Hydra's submitit launcher submits a Hydra multirun; our grid is not one — see
``research.experiments.grid`` —
so the same profile keys go to submitit directly.)
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from components.registry import require
from research.launch import Submitted, Task
from research.launch.entry import TaskEntry

ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED")  # fmt: skip


class SlurmLauncher:
    """A task as one job array of the profile's shape; ``Task.after`` becomes an ``afterany``
    dependency (a requeued task is not ended)."""

    name = "slurm"

    def __init__(self, profile: DictConfig, **_: Any):
        self.profile = profile

    def run_overrides(self) -> list[str]:
        return run_overrides(self.profile)

    def submit(self, task: Task, folder: Path) -> list[Submitted]:
        profile = OmegaConf.merge(self.profile, task.resources)
        if task.after:  # on whole arrays: every task of each
            arrays = sorted({job_id.split("_")[0] for job_id in task.after})
            sbatch = [*(profile.sbatch or []), f"--dependency=afterany:{':'.join(arrays)}"]
            profile = OmegaConf.merge(profile, {"sbatch": sbatch})
        executor = make_executor(profile, folder / "slurm", task.name, task.signal)
        with sbatch_refusal(profile):
            jobs = executor.map_array(TaskEntry(task.entry, task.signal), *zip(*task.calls, strict=True))
        where = zip(task.labels, task.run_dirs, jobs, strict=True)
        return [Submitted(i, label, job.job_id, run_dir, str(job.paths.stdout))
                for i, (label, run_dir, job) in enumerate(where)]  # fmt: skip

    def wait(self, jobs: list[Submitted]) -> dict[str, str]:
        return wait([j.job_id for j in jobs])

    def status(self, job_ids: list[str]) -> dict[str, str]:
        return job_states(job_ids)

    def requeue(self) -> None:
        requeue()


LAUNCHER = SlurmLauncher


def requeue() -> None:
    """Put the job this process runs in back in Slurm's queue."""
    job = os.environ["SLURM_JOB_ID"]
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job} failed: {done.stderr.strip()}")


def sbatch_options(lines: list[str]) -> dict[str, Any]:
    """``["--exclusive", "--reservation=x"]`` -> submitit's additional parameters."""
    options: dict[str, Any] = {}
    for line in lines:
        require(line.startswith("--"), "cluster.sbatch", line, "options like --exclusive or --key=value")
        key, _, value = line[2:].partition("=")
        options[key.replace("-", "_")] = value or True
    return options


def run_overrides(profile: DictConfig) -> list[str]:
    """What a run needs to match its allocation: one device per task, every node."""
    gpus = int(profile.gpus_per_node or 0)
    if gpus == 0:
        return []
    return ["trainer.accelerator=gpu", f"trainer.devices={gpus}", f"trainer.num_nodes={profile.nodes}"]


def make_executor(profile: DictConfig, folder: Path, name: str, signal_name: str):
    """A submitit executor for ``profile`` (a ``cluster`` config node)."""
    import submitit

    if not _sbatch_available():
        raise ValueError("cluster.launcher=slurm but there is no Slurm here (sinfo failed); "
                         "start one with cluster/slurm.sh start, or use cluster=local")  # fmt: skip
    gpus = int(profile.gpus_per_node or 0)
    tasks = int(profile.tasks_per_node or max(1, gpus))
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=0)
    extra = {"signal": f"{signal_name}@{int(profile.signal_delay_s)}", "requeue": True,
             **sbatch_options(list(profile.sbatch or []))}  # fmt: skip
    if profile.constraint:
        extra["constraint"] = profile.constraint
    for key in ("account", "qos"):
        if profile.get(key):
            extra[key] = profile[key]
    params: dict[str, Any] = dict(
        name=name,
        nodes=int(profile.nodes),
        tasks_per_node=tasks,
        cpus_per_task=int(profile.cpus_per_gpu),
        timeout_min=int(profile.time_min),
        slurm_partition=profile.partition,
        slurm_array_parallelism=int(profile.array_parallelism),
        slurm_setup=list(profile.setup or []),
        slurm_additional_parameters=extra,
    )
    if gpus:
        params["gpus_per_node"] = gpus
    if profile.get("mem_gb"):
        params["mem_gb"] = int(profile.mem_gb)
    executor.update_parameters(**params)
    return executor


# sbatch's refusal -> the profile keys that usually cause it (Slurm's wording, lower-cased).
REFUSAL_KEYS = (
    ("feature specification", ("constraint",)),
    ("generic resource", ("gpus_per_node",)),
    ("partition", ("partition",)),
    ("account", ("account",)),
    ("qos", ("qos",)),
    ("time limit", ("time_min",)),
    ("memory", ("mem_gb",)),
    ("node count", ("nodes",)),
    ("node configuration", ("gpus_per_node", "constraint", "cpus_per_gpu", "mem_gb")),
)


@contextlib.contextmanager
def sbatch_refusal(profile: DictConfig) -> Iterator[None]:
    """sbatch refusing a submission as one line naming the profile key to change, not submitit's
    traceback (submitit also prints sbatch's stderr itself: held back here)."""
    from submitit.core.utils import FailedJobError

    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except FailedJobError as e:
        lines = [line.strip().removeprefix("sbatch: error: ") for line in str(e).splitlines() if line.strip()]
        reason = (lines[-1] if lines else "no reason given").removeprefix("Batch job submission failed: ")
        keys = next((keys for words, keys in REFUSAL_KEYS if words in reason.lower()), ())
        where = f"cluster profile '{profile.name}'"
        change = ", ".join(f"cluster.{k} (now {profile.get(k)!r})" for k in keys)
        hint = f"; change {change} in {where}" if keys else f"; check {where}"
        raise ValueError(f"sbatch refused the job: {reason}{hint}") from None


def _sbatch_available() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# --- what runs inside a Slurm task -------------------------------------------------------------


def in_job() -> bool:
    """Whether this process runs in a job this launcher submitted."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def job_id() -> str:
    """This job as ``squeue`` and ``sacct`` name it: ``ARRAY_TASK`` for an array task."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID", "")


def link_logs(run_dir: Path) -> None:
    """``<run>/slurm.out`` and ``slurm.err``: this task's log files, found from the run's folder."""
    import submitit

    paths = submitit.JobEnvironment().paths
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, target in (("slurm.out", paths.stdout), ("slurm.err", paths.stderr)):
        link = run_dir / name
        link.unlink(missing_ok=True)
        link.symlink_to(Path(target).resolve())


# --- submission records and status -------------------------------------------------------------


def job_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm's state of each job: accounting (sacct) for every job, the queue (squeue) as fallback."""
    states: dict[str, str] = {}
    if not job_ids:
        return states
    arrays = sorted({j.split("_")[0] for j in job_ids})
    acct = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(arrays)],
                          capture_output=True, text=True)  # fmt: skip
    queue = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(arrays)],
                           capture_output=True, text=True)  # fmt: skip
    for out in (acct.stdout if acct.returncode == 0 else "", queue.stdout if queue.returncode == 0 else ""):
        for line in out.splitlines():
            job, _, state = line.partition("|")
            if job in job_ids:
                states[job] = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
    return states


def wait(job_ids: list[str], poll_s: float = 3.0) -> dict[str, str]:
    """Block until every job ended (a requeued job is not ended); rich progress meanwhile."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]slurm"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[s]}"),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns) as progress:
        task = progress.add_task("jobs", total=len(job_ids), s="")
        while True:
            states = job_states(job_ids)
            ended = [j for j in job_ids if states.get(j) in ENDED]
            counts = Counter(states.get(j, "SUBMITTED") for j in job_ids)
            progress.update(
                task, completed=len(ended), s="  ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            )
            if len(ended) == len(job_ids):
                return states
            time.sleep(poll_s)
