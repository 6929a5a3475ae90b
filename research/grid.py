"""Ablation grids: one YAML per question in ``ablations/``, launched as one process per run.

A grid file is a Hydra config (group ``ablations``, package ``_global_``) with a ``grid`` node:

    grid:
      params: {attention: [mha, gqa, mla]}   # every combination is one arm
      seeds: [0, 1, 2]
      baseline: attention=mha
      metrics: [val/bpb, perf/tokens_per_s]

Each (arm, seed) runs as its own ``lab train`` process: a crash, an out-of-memory kill or a NaN
in one run never stops the others, each run's peak memory is its own, and on a multi-GPU host each
process is pinned to one GPU. Runs whose config hash already FINISHED in the grid's experiment are
skipped, so re-launching a grid only runs what is missing or failed.
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
from research import tracking

REPO_ROOT = Path(__file__).resolve().parents[1]


def search_roots() -> list[Path]:
    """Folders whose ``ablations/`` hold grid files: the working folder's first, then the project's."""
    roots = [Path.cwd(), REPO_ROOT]
    return [r for i, r in enumerate(roots) if (r / "ablations").is_dir() and r not in roots[:i]]


def searchpath_override() -> str:
    return "hydra.searchpath=[" + ",".join(f"file://{r}" for r in search_roots()) + "]"


def available() -> list[str]:
    return sorted({p.stem for r in search_roots() for p in (r / "ablations").glob("*.yaml")})


def compose_grid(name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_module

    if name not in available():
        raise spec_error("grid", name, available())
    with initialize_config_module("research.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"ablations={name}", searchpath_override(), *overrides])
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


def arms(cfg: DictConfig) -> dict[str, list[str]]:
    """Arm label -> its overrides: named bundles (``grid.arms``) or every combination of
    ``grid.params``."""
    if cfg.grid.get("arms"):
        return {name: list(ovs) for name, ovs in OmegaConf.to_container(cfg.grid.arms, resolve=True).items()}
    params = OmegaConf.to_container(cfg.grid.params, resolve=True)
    values = [v if isinstance(v, list) else [v] for v in params.values()]
    combos = (
        [f"{k}={v}" for k, v in zip(params, combo, strict=True)] for combo in itertools.product(*values)
    )
    return {" ".join(arm): arm for arm in combos}


def expand(name: str, cfg: DictConfig, overrides: list[str]) -> list[Job]:
    """Every arm times every seed; the command line's overrides apply to all of them, last."""
    seeds = list(cfg.grid.get("seeds") or [cfg.seed])
    jobs = []
    for label, arm in arms(cfg).items():
        for seed in seeds:
            job_overrides = [f"ablations={name}", *arm, f"seed={seed}", f"++grid.arm='{label}'", *overrides]
            jobs.append(Job(len(jobs), label, int(seed), job_overrides))
    return jobs


def job_hash(job: Job) -> str:
    from hydra import compose, initialize_config_module

    with initialize_config_module("research.conf", version_base="1.3"):
        cfg = compose("train", overrides=[searchpath_override(), *job.overrides])
    return tracking.config_hash(cfg)


def _finished_hashes(uri: str, experiment: str) -> set[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp_id = tracking.ensure_experiment(uri, experiment)  # create store + experiment before any job
    runs = client.search_runs([exp_id], "attributes.status = 'FINISHED'", max_results=50_000)
    return {r.data.tags.get("config_hash") for r in runs}


def run_grid(name: str, overrides: list[str], jobs: int = 1, gpus: list[str] | None = None) -> Path:
    """Launch a grid; return its folder (one sub-folder per run with its log and checkpoints)."""
    cfg = compose_grid(name, overrides)
    grid_jobs = expand(name, cfg, overrides)
    finished = _finished_hashes(cfg.tracking.uri, cfg.tracking.experiment)
    for job in grid_jobs:
        if job_hash(job) in finished:
            job.status = "skipped"
    todo = [j for j in grid_jobs if j.status == "pending"]
    if todo:  # tokenize once here rather than in every run at once
        from research.data import tokenize_corpus

        tokenize_corpus(cfg.data)
    grid_dir = Path("multirun") / cfg.ablation / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    print(
        f"grid '{name}': {len(grid_jobs)} runs, {len(grid_jobs) - len(todo)} already finished -> {grid_dir}"
    )

    slots = gpus or [None] * max(1, jobs)
    threads = max(1, (os.cpu_count() or 1) // len(slots))
    running: dict[int, tuple[subprocess.Popen, Job, Path]] = {}  # slot -> (process, job, folder)
    queue = list(todo)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[counts]}"), TimeElapsedColumn()) as progress:  # fmt: skip
        task = progress.add_task(name, total=len(todo), counts="")
        while queue or running:
            for slot in range(len(slots)):
                if slot not in running and queue:
                    job = queue.pop(0)
                    proc, job_dir = _launch(job, grid_dir, slots[slot], threads)
                    running[slot] = (proc, job, job_dir)
            for slot, (proc, job, job_dir) in list(running.items()):
                if proc.poll() is not None:
                    proc.log_file.close()
                    job.status = "done" if proc.returncode == 0 else "failed"
                    if proc.returncode != 0:
                        _close_orphan_run(cfg.tracking.uri, cfg.tracking.experiment, job_dir, proc.returncode)
                    del running[slot]
                    progress.advance(task)
            done = sum(j.status == "done" for j in todo)
            failed = sum(j.status == "failed" for j in todo)
            progress.update(task, counts=f"done {done}  failed {failed}  left {len(queue) + len(running)}")
            time.sleep(0.2)
    for job in todo:
        if job.status == "failed":
            log = grid_dir / str(job.index) / "log.txt"
            print(f"failed: {job.arm} seed={job.seed}: {_last_error(log)} (log: {log})")
    return grid_dir


def _launch(job: Job, grid_dir: Path, gpu: str | None, threads: int) -> tuple[subprocess.Popen, Path]:
    job_dir = grid_dir / str(job.index)
    job_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    args = [sys.executable, "-m", "research.cli", "train", *job.overrides, f"hydra.run.dir={job_dir}",
            "trainer.progress_bar=false"]  # fmt: skip
    log = open(job_dir / "log.txt", "w")  # noqa: SIM115  (closed with the process)
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.log_file = log  # type: ignore[attr-defined]
    return proc, job_dir


def _last_error(log: Path) -> str:
    lines = (
        [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        if log.exists()
        else []
    )
    flagged = [line for line in lines if line.startswith(("error:", "run failed:"))]
    return (flagged or lines or ["no output"])[-1]


def _close_orphan_run(uri: str, experiment: str, job_dir: Path, returncode: int) -> None:
    """A run killed hard (signal, OOM) cannot mark itself FAILED: do it for it."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    query = f"attributes.status = 'RUNNING' and tags.run_dir = '{job_dir.resolve()}'"
    for run in client.search_runs([exp.experiment_id], query) if exp else []:
        client.set_tag(run.info.run_id, "failure_reason", f"process exited with code {returncode}")
        client.set_terminated(run.info.run_id, "FAILED")
