"""Ablation grids: one YAML per question in ``ablations/``, launched as one process per run.

A grid file is a Hydra config (group ``ablations``, package ``_global_``) with a ``grid`` node:

    grid:
      params: {attention: [mha, gqa, mla]}   # every combination is one arm
      seeds: [0, 1, 2]
      baseline: attention=mha

Each (arm, seed) runs as its own ``lab train`` process: a crash, an out-of-memory kill or a NaN
in one run never stops the others, each run's peak memory is its own, and on a multi-GPU host each
process is pinned to one GPU. With a Slurm profile (``cluster=slurm_h100``) the same runs go out as
one job array instead (``research.slurm``). Runs whose config hash already FINISHED in the grid's
experiment are skipped, and one that was cut short (killed, timed out) continues from its last
checkpoint into its MLflow run, so re-launching a grid only runs what is missing.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from components.registry import require, spec_error
from research import ownership

REPO_ROOT = Path(__file__).resolve().parents[1]


def search_roots() -> list[Path]:
    """Folders holding grid files (``ablations/``) or Slurm profiles (``cluster/``): the working
    folder's first, then the project's."""
    roots = [Path.cwd(), REPO_ROOT]
    return [r for i, r in enumerate(roots)
            if ((r / "ablations").is_dir() or (r / "cluster").is_dir()) and r not in roots[:i]]  # fmt: skip


def searchpath_override() -> str:
    return "hydra.searchpath=[" + ",".join(f"file://{r}" for r in search_roots()) + "]"


def named_files(folder: str) -> list[str]:
    """The names of the YAML files in ``folder/`` of the working folder and of the project."""
    return sorted(
        {p.stem for r in dict.fromkeys([Path.cwd(), REPO_ROOT]) for p in (r / folder).glob("*.yaml")}
    )


def available() -> list[str]:
    return named_files("ablations")


def compose_run(overrides: list[str]) -> DictConfig:
    """The config ``lab train OVERRIDES`` runs (grid files and ./cluster profiles found too)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("research.conf", version_base="1.3"):
        return compose("train", overrides=[searchpath_override(), *overrides])


def compose_grid(name: str, overrides: list[str]) -> DictConfig:
    if name not in available():
        raise spec_error("grid", name, available())
    cfg = compose_run([f"ablations={name}", *overrides])
    ok = "grid" in cfg and ("params" in cfg.grid or "arms" in cfg.grid)
    require(ok, f"ablations/{name}.yaml", "no grid.params or grid.arms", "a grid node with one of them")
    return cfg


@dataclass
class Job:
    index: int
    arm: str  # its label, e.g. "attention=mla ffn=moe"
    seed: int
    overrides: list[str] = field(default_factory=list)  # everything passed to `lab train`
    status: str = "pending"  # pending | skipped | done | failed
    run_dir: Path | None = None  # set at launch; an unfinished run's own folder when it resumes


def arms(cfg: DictConfig) -> dict[str, list[str]]:
    """Arm label -> its overrides: every combination of ``grid.params``, or named bundles
    (``grid.arms``), or with both, each bundle crossed with every combination."""
    params = OmegaConf.to_container(cfg.grid.params, resolve=True) if cfg.grid.get("params") else {}
    values = [v if isinstance(v, list) else [v] for v in params.values()]
    overrides = ([f"{k}={v}" for k, v in zip(params, c, strict=True)] for c in itertools.product(*values))
    combos = {" ".join(arm): arm for arm in overrides}
    if not cfg.grid.get("arms"):
        return combos
    bundles = OmegaConf.to_container(cfg.grid.arms, resolve=True)
    return {" ".join(filter(None, (name, label))): [*ovs, *combo]
            for name, ovs in bundles.items() for label, combo in combos.items()}  # fmt: skip


def expand(name: str, cfg: DictConfig, overrides: list[str]) -> list[Job]:
    """Every arm times every seed; the command line's overrides apply to all of them, last."""
    from research import tracking  # with Lightning: imported only once a grid runs, not to list

    seeds = list(cfg.grid.get("seeds") or [cfg.seed])
    base = tracking.config_hash(cfg)  # the launch's config without any arm: what its arms share
    jobs = []
    for label, arm in arms(cfg).items():
        for seed in seeds:
            job_overrides = [f"ablations={name}", *arm, f"seed={seed}", f"++grid.arm='{label}'",
                             f"++grid.base={base}", *overrides]  # fmt: skip
            jobs.append(Job(len(jobs), label, int(seed), job_overrides))
    return jobs


def job_hash(job: Job) -> str:
    from research import tracking

    return tracking.config_hash(compose_run(job.overrides))


def _previous_runs(uri: str, experiment: str, root: Path) -> tuple[set[str], dict[str, Path]]:
    """Config hashes that FINISHED, and the folders of runs that did not but left a checkpoint of
    their config. Only folders under ``root`` (the grid's own output) are resumed from: a run's
    ``run_dir`` tag is writable by anyone who can write to the store. An unfinished run with
    nothing to resume from is closed as KILLED, so the relaunch's new run does not sit beside a
    RUNNING one; a run whose folder's owner still trains it stops the relaunch."""
    from mlflow import MlflowClient

    from research import preemption, tracking

    client = MlflowClient(tracking_uri=uri)
    exp_id = tracking.ensure_experiment(uri, experiment)  # create store + experiment before any job
    root = root.resolve()
    finished, unfinished = set(), {}
    for r in client.search_runs([exp_id], max_results=50_000, order_by=["attributes.start_time ASC"]):
        h, run_dir = r.data.tags.get("config_hash"), Path(r.data.tags.get("run_dir", "-")).resolve()
        if r.info.status == "FINISHED":
            finished.add(h)
            continue
        if not run_dir.is_relative_to(root):
            continue
        owner = ownership.owner_of(run_dir)
        if owner is not None and owner.alive():
            raise ownership.RunFolderBusy(ownership.busy_message(run_dir, owner))
        if preemption.find_latest(run_dir, h) is not None:
            unfinished[h] = run_dir
        elif r.info.status in ("RUNNING", "SCHEDULED"):
            reason = "killed before a checkpoint it could resume from; the grid's relaunch runs it again"
            tracking.close_abandoned(uri, r.info.run_id, reason)
    return finished, unfinished


def run_grid(
    name: str, overrides: list[str], jobs: int = 1, gpus: list[str] | None = None, wait: bool = True
) -> list[str]:
    """Launch a grid (its folder: one sub-folder per run with its log and checkpoints); return the
    runs that failed, as "ARM seed=N". On Slurm, ``wait=False`` returns once the job array is
    submitted."""
    from research import slurm

    cfg = compose_grid(name, overrides)
    on_slurm = slurm.launcher(cfg) == "slurm"
    if on_slurm:  # every run must fit the allocation: one device per task, every node
        overrides = [*overrides, *slurm.run_overrides(cfg.cluster)]
    grid_jobs = expand(name, cfg, overrides)
    root = Path("multirun") / cfg.ablation
    finished, unfinished = _previous_runs(cfg.tracking.uri, cfg.tracking.experiment, root)
    grid_dir = root / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    for job in grid_jobs:
        h = job_hash(job)
        job.status = "skipped" if h in finished else "pending"
        job.run_dir = unfinished.get(h, grid_dir / str(job.index))
    todo = [j for j in grid_jobs if j.status == "pending"]
    if todo:  # tokenize once here rather than in every run at once
        from research.data import tokenize_corpus

        tokenize_corpus(cfg.data)
    resumed = sum(j.run_dir != grid_dir / str(j.index) for j in todo)
    print(f"grid '{name}': {len(grid_jobs)} runs, {len(grid_jobs) - len(todo)} already finished, "
          f"{resumed} resuming from a checkpoint -> {grid_dir}")  # fmt: skip
    if on_slurm:
        return _submit(cfg, name, todo, grid_dir, wait)
    return _run_locally(name, cfg, todo, grid_dir, jobs, gpus)


def submit_run(cfg: DictConfig, overrides: list[str]) -> None:
    """``lab train OVERRIDES`` with a Slurm profile: one job, sent as a grid of one so that
    ``lab status ABLATION`` and resuming work as for grids."""
    from research import slurm
    from research.data import tokenize_corpus

    overrides = [*overrides, *slurm.run_overrides(cfg.cluster)]
    root = Path("multirun") / cfg.ablation
    finished, unfinished = _previous_runs(cfg.tracking.uri, cfg.tracking.experiment, root)
    arm = " ".join(o for o in overrides if not o.startswith(("cluster", "trainer.", "seed="))) or "(defaults)"
    grid_dir = root / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    job = Job(0, arm, int(cfg.seed), overrides, run_dir=grid_dir / "0")
    h = job_hash(job)
    if h in finished:
        print(f"this config already FINISHED in experiment '{cfg.tracking.experiment}' (config_hash {h})")
        return
    job.run_dir = unfinished.get(h, job.run_dir)
    if job.run_dir != grid_dir / "0":
        print(f"resuming the unfinished run in {job.run_dir} from its checkpoint")
    tokenize_corpus(cfg.data)
    _submit(cfg, cfg.ablation, [job], grid_dir, wait=False, kind="run")


def _submit(cfg: DictConfig, name: str, todo: list[Job], grid_dir: Path, wait: bool,
            kind: str = "grid") -> list[str]:  # fmt: skip
    from research import slurm
    from research.slurm_entry import SlurmEntry

    if not todo:
        return []
    grid_dir.mkdir(parents=True, exist_ok=True)
    executor = slurm.make_executor(cfg.cluster, grid_dir / "slurm", f"lab-{cfg.ablation}",
                                   cfg.trainer.requeue_signal)  # fmt: skip
    positions = [str(i) for i in range(len(todo))]
    with slurm.sbatch_refusal(cfg.cluster):
        array = executor.map_array(
            SlurmEntry("research.slurm:run_grid_job", cfg.trainer.requeue_signal),
            [[*j.overrides, "trainer.progress_bar=false"] for j in todo],
            [str(j.run_dir.resolve()) for j in todo],
        )
    submitted = [
        slurm.Submitted(int(p), f"{j.arm} seed={j.seed}", a.job_id, str(j.run_dir), str(a.paths.stdout))
        for p, j, a in zip(positions, todo, array, strict=True)
    ]
    record = slurm.write_record(grid_dir, kind, cfg.ablation, cfg.cluster.name, submitted)
    print(f"submitted job array {array[0].job_id.split('_')[0]} ({len(todo)} runs, "
          f"{cfg.cluster.array_parallelism} at a time) on '{cfg.cluster.name}'; record {record}; "
          f"see `lab status {cfg.ablation}`")  # fmt: skip
    if not wait:
        return []
    states = slurm.wait([s.job_id for s in submitted])
    failed = [s for s in submitted if states.get(s.job_id) != "COMPLETED"]
    for s in failed:
        print(f"failed: {s.label}: Slurm state {states.get(s.job_id)} (log: {s.log})")
    return [s.label for s in failed]


def _run_locally(name: str, cfg: DictConfig, todo: list[Job], grid_dir: Path, jobs: int,
                 gpus: list[str] | None) -> list[str]:  # fmt: skip
    slots = gpus or [None] * max(1, jobs)
    threads = max(1, (os.cpu_count() or 1) // len(slots))
    running: dict[int, tuple[subprocess.Popen, Job]] = {}  # slot -> (process, job)
    queue = list(todo)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[counts]}"), TimeElapsedColumn()) as progress:  # fmt: skip
        task = progress.add_task(name, total=len(todo), counts="")
        while queue or running:
            for slot in range(len(slots)):
                if slot not in running and queue:
                    job = queue.pop(0)
                    running[slot] = (_launch(job, slots[slot], threads), job)
            for slot, (proc, job) in list(running.items()):
                if proc.poll() is not None:
                    proc.log_file.close()
                    job.status = "done" if proc.returncode == 0 else "failed"
                    if proc.returncode != 0:
                        _record_failure(cfg, job, proc.returncode)
                    del running[slot]
                    progress.advance(task)
            done = sum(j.status == "done" for j in todo)
            failed = sum(j.status == "failed" for j in todo)
            progress.update(task, counts=f"done {done}  failed {failed}  left {len(queue) + len(running)}")
            time.sleep(0.2)
    failed = [job for job in todo if job.status == "failed"]
    for job in failed:
        log = job.run_dir / "log.txt"
        print(f"failed: {job.arm} seed={job.seed}: {_last_error(log)} (log: {log})")
    return [f"{job.arm} seed={job.seed}" for job in failed]


def _launch(job: Job, gpu: str | None, threads: int) -> subprocess.Popen:
    job.run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    args = [sys.executable, "-m", "research.cli", "train", *job.overrides, f"hydra.run.dir={job.run_dir}",
            "trainer.progress_bar=false"]  # fmt: skip
    log = open(job.run_dir / "log.txt", "a")  # noqa: SIM115  (closed with the process)
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.log_file = log  # type: ignore[attr-defined]
    return proc


def _last_error(log: Path) -> str:
    lines = (
        [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        if log.exists()
        else []
    )
    flagged = [line for line in lines if line.startswith(("error:", "run failed:"))]
    return (flagged or lines or ["no output"])[-1]


def _record_failure(cfg: DictConfig, job: Job, returncode: int) -> None:
    """A run that exited non-zero: one killed hard (signal, OOM) cannot mark itself FAILED, so do
    it for it; one that failed before its MLflow run existed gets a FAILED run with the reason, so
    the comparison lists it instead of leaving its arm silently short."""
    from mlflow import MlflowClient

    from research import tracking

    uri, experiment = cfg.tracking.uri, cfg.tracking.experiment
    client = MlflowClient(tracking_uri=uri)
    exp_id = tracking.ensure_experiment(uri, experiment)
    query = f"tags.run_dir = '{job.run_dir.resolve()}'"
    runs = client.search_runs([exp_id], query)
    for run in runs:
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "failure_reason", f"process exited with code {returncode}")
            client.set_terminated(run.info.run_id, "FAILED")
    if runs:
        return
    reason = _last_error(job.run_dir / "log.txt")
    tags = {"ablation": cfg.ablation, "arm": job.arm, "baseline": cfg.grid.get("baseline") or "",
            "run_dir": str(job.run_dir.resolve()), "failure_reason": reason}  # fmt: skip
    run = client.create_run(exp_id, run_name=tracking.run_name(cfg.ablation, job.arm, job.seed), tags=tags)
    client.log_param(run.info.run_id, "seed", job.seed)
    client.set_terminated(run.info.run_id, "FAILED")
