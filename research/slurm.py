"""Grids and sweeps on Slurm, through submitit: a profile (``cluster=NAME``) becomes sbatch options.

A grid is one job array (``array_parallelism`` runs at a time), one array task per run; a sweep is
one array of N workers sharing the study's storage. Each task composes its run's config from the
same overrides ``lab train`` would get and calls ``train()`` in the Slurm task itself, so with
``gpus_per_node`` GPUs Slurm starts one task per GPU and Lightning reads the ranks from Slurm.
Time limits and preemption are handled by ``research.preemption`` (``--signal`` is set to
``trainer.requeue_signal``; submitit's own requeue is not used). Every submission writes
``jobs.json`` beside its runs for ``lab status``; submitit's files go to ``<grid>/slurm/`` and each
run's folder links its own log files as ``slurm.out`` and ``slurm.err``.

(Hydra's submitit launcher submits a Hydra multirun; our grid is not one — see ``research.grid`` —
so the same profile keys go to submitit directly.)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from components.registry import require

LAUNCHERS = ("local", "slurm")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED")  # fmt: skip


def launcher(cfg: DictConfig) -> str:
    name = (cfg.get("cluster") or {}).get("launcher", "local")
    require(name in LAUNCHERS, "cluster.launcher", name, ", ".join(LAUNCHERS))
    return name


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


def slurm_tags() -> dict[str, str]:
    """The job as ``squeue`` and ``sacct`` name it: ``ARRAY_TASK`` for an array task."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env:
        return {"slurm.job_id": f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"}
    return {"slurm.job_id": env.get("SLURM_JOB_ID", "")}


def link_logs(run_dir: Path) -> None:
    """``<run>/slurm.out`` and ``slurm.err``: this task's log files, found from the run's folder."""
    import submitit

    paths = submitit.JobEnvironment().paths
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, target in (("slurm.out", paths.stdout), ("slurm.err", paths.stderr)):
        link = run_dir / name
        link.unlink(missing_ok=True)
        link.symlink_to(Path(target).resolve())


def run_grid_job(overrides: list[str], run_dir: str) -> float | None:
    """One grid run in its Slurm task(s): the same config ``lab train OVERRIDES`` would compose."""
    from research import preemption
    from research.cli import quiet
    from research.grid import compose_run
    from research.train import train

    cfg = compose_run(overrides)
    preemption.install(cfg.trainer.requeue_signal)  # takes over from SlurmEntry's hold
    quiet()
    link_logs(Path(run_dir))
    try:
        result = train(cfg, Path(run_dir), overrides, slurm_tags())
    except preemption.Requeued:
        os._exit(0)  # Slurm starts the job again; submitit must not record this attempt as its result
    return result.metrics.get("val/bpb")


# --- submission records and status -------------------------------------------------------------


@dataclass
class Submitted:
    index: int
    label: str  # the arm and seed, or the sweep worker
    job_id: str  # Slurm's, e.g. 1234_0 for an array task
    run_dir: str
    log: str  # its stdout file (stderr beside it)


def write_record(folder: Path, kind: str, name: str, profile: str, jobs: list[Submitted]) -> Path:
    path = folder / "jobs.json"
    record = {"kind": kind, "name": name, "profile": profile, "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
              "jobs": [asdict(j) for j in jobs]}  # fmt: skip
    path.write_text(json.dumps(record, indent=2))
    return path


def find_records(name: str) -> list[Path]:
    """Submissions of grid or sweep ``name``, newest last."""
    found = [*Path("multirun", name).glob("*/jobs.json"), *Path("sweeps_out", name).glob("*/jobs.json")]
    return sorted(found, key=lambda p: p.stat().st_mtime)


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


def current_records(name: str) -> list[dict[str, Any]]:
    """What ``lab status NAME`` shows: a grid's or sweep's newest submission (a relaunch submits
    what is left of the same runs), or every ``lab train cluster=...`` submission of ablation
    ``name`` (each its own run), oldest first."""
    records = [json.loads(p.read_text()) for p in find_records(name)]
    require(bool(records), "name", name, "a grid or sweep submitted to Slurm (no multirun/NAME/*/jobs.json)")
    if records[-1]["kind"] == "run":
        return [r for r in records if r["kind"] == "run"]
    return records[-1:]


def status(name: str, uri: str | None = None) -> list[dict[str, str]]:
    """Each job of ``current_records(name)``: its Slurm state and MLflow run."""
    from mlflow import MlflowClient

    jobs = [(record["kind"], Submitted(**j)) for record in current_records(name) for j in record["jobs"]]
    states = job_states([j.job_id for _, j in jobs])
    client = MlflowClient(tracking_uri=uri or "sqlite:///mlruns.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    rows = []
    for kind, j in jobs:
        query = (
            f"tags.`slurm.job_id` = '{j.job_id}'"
            if kind == "sweep"
            else f"tags.run_dir = '{Path(j.run_dir).resolve()}'"
        )
        runs = client.search_runs(experiments, query)
        rows.append({"job": j.job_id, "what": j.label, "state": states.get(j.job_id, "UNKNOWN"),
                     "runs": " ".join(f"{r.info.run_id[:8]} {r.info.status}" for r in runs) or "-",
                     "log": j.log})  # fmt: skip
    return rows


def print_status(name: str, uri: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = status(name, uri)
    shown = current_records(name)
    title = (
        f"{name}: {len(shown)} runs submitted one by one"
        if len(shown) > 1
        else f"{name}: {shown[0]['submitted']}"
    )
    table = Table(title=title)
    for column in ("job", "what", "state", "runs", "log"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row.values())
    Console(width=160).print(table)
