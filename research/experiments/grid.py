"""Ablation grids: one YAML per question in ``ablations/``, launched as one job per run.

A grid file is a Hydra config (group ``ablations``, package ``_global_``) with a ``grid`` node:

    grid:
      params: {attention: [mha, gqa, mla]}   # every combination is one arm
      seeds: [0, 1, 2]
      baseline: attention=mha

Two optional keys change what each arm trains (``research.experiments.budget``):

    grid:
      sizes: [tiny, small]          # a ladder: every arm at every size (presets, or model keys)
      budget: {flops: 3e15}         # compute-matched arms: each arm's steps from its own cost

Each (size, arm, seed) is one job of the cluster profile's launcher (``research.launch``): locally its
own process, pinned to a GPU on a multi-GPU host; with a Slurm profile (``cluster=slurm_h100``) one
task of a job array. A job composes the same config ``lab train`` would and trains it. Runs whose
config hash already FINISHED in the grid's experiment are skipped, and one that was cut short
(killed, timed out) continues from its last checkpoint into its MLflow run, so re-launching a grid
only runs what is missing.
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from components.registry import require, spec_error
from research import signals
from research.config.compose import CONF_DIR, compose_run, named_files
from research.errors import TrainingDiverged
from research.experiments import budget, launching
from research.launch import COMPLETED, Launcher, Task, get_launcher, launcher_name, slurm
from research.runtime import USER_ERRORS, one_line, quiet, stamped
from research.tracking import store
from research.tracking import tags as T
from research.training import checkpoints, ownership, preemption
from research.training.data import tokenize_corpus
from research.training.probe import tokens_per_s
from research.training.run import print_summary, train


def available() -> list[str]:
    return named_files("ablations")


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
    size: str = ""  # its rung of grid.sizes ("" without a ladder)

    @property
    def cell(self) -> str:  # its arm at its size
        return f"{self.arm} [{self.size}]" if self.size else self.arm

    @property
    def label(self) -> str:
        return f"{self.cell} seed={self.seed}"


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


def sizes(cfg: DictConfig) -> dict[str, list[str]]:
    """Size label -> its overrides, from ``grid.sizes``: each a preset of ``conf/model`` (``small``)
    or a mapping of model keys (``{d_model: 384, n_layers: 8}``, optionally ``name: wide``, and
    ``preset: small`` to start from one); ``{"": []}`` without a ladder."""
    node = cfg.grid.get("sizes")
    if node is None:
        return {"": []}
    allowed = f"a list of presets ({', '.join(model_presets())}) or mappings of model keys"
    listed = OmegaConf.to_container(node, resolve=True)
    require(isinstance(listed, list) and len(listed) > 0, "grid.sizes", listed, allowed)
    out: dict[str, list[str]] = {}
    for size in listed:
        if isinstance(size, str):
            require(size in model_presets(), "grid.sizes", size, allowed)
            label, ovs = size, [f"model={size}"]
        else:
            require(isinstance(size, dict) and bool(size), "grid.sizes", size, allowed)
            size = dict(size)
            name, preset = size.pop("name", None), size.pop("preset", None)
            require(preset is None or preset in model_presets(), "grid.sizes.preset", preset, allowed)
            ovs = [f"model={preset}"] * (preset is not None) + [f"model.{k}={v}" for k, v in size.items()]
            label = str(name or " ".join(filter(None, [preset, *(f"{k}={v}" for k, v in size.items())])))
        require(label not in out, "grid.sizes", label, "each size once")
        out[label] = ovs
    return out


def model_presets() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def expand(name: str, cfg: DictConfig, overrides: list[str]) -> list[Job]:
    """Every size times every arm times every seed; the command line's overrides apply to all of
    them, last. A ``grid.budget`` is checked here and spent in ``run_grid`` (``with_budget``)."""
    if budget.budget_of(cfg) is not None:
        budget.refuse_fixed_steps([*overrides, *(o for arm in arms(cfg).values() for o in arm)])
    seeds = list(cfg.grid.get("seeds") or [cfg.seed])
    base = store.config_hash(cfg)  # the launch's config without any arm: what its arms share
    jobs = []
    for size, size_overrides in sizes(cfg).items():
        on_ladder = [f"++grid.size='{size}'"] if size else []
        for label, arm in arms(cfg).items():
            for seed in seeds:
                job_overrides = [f"ablations={name}", *size_overrides, *arm, f"seed={seed}",
                                 f"++grid.arm='{label}'", *on_ladder, f"++grid.base={base}",
                                 *overrides]  # fmt: skip
                jobs.append(Job(len(jobs), label, int(seed), job_overrides, size=size))
    return jobs


def with_budget(cfg: DictConfig, jobs: list[Job], root: Path) -> None:
    """Each job's ``trainer.max_steps`` from ``grid.budget``: one count per (size, arm), which its
    seeds share; printed, so the split of the budget is seen before anything trains."""
    spend = budget.budget_of(cfg)
    if spend is None:
        return
    probe = None
    if spend.kind == "gpu_seconds":
        where = "a local grid: the probes time each arm on this machine's GPU (on Slurm: tokens or flops)"
        require(launcher_name(cfg) == "local", "grid.budget.gpu_seconds", spend.amount, where)
        probe = budget.ProbeCache(root / "probes.json", tokens_per_s)
    steps: dict[tuple[str, str], int] = {}
    for job in jobs:
        if (job.size, job.arm) not in steps:
            steps[job.size, job.arm] = budget.steps_for(spend, compose_run(job.overrides), probe)
            print(f"budget {spend}: {job.cell} trains {steps[job.size, job.arm]:,} steps")
        job.overrides.append(f"trainer.max_steps={steps[job.size, job.arm]}")


def job_hash(job: Job) -> str:
    return store.config_hash(compose_run(job.overrides))


def _previous_runs(uri: str, experiment: str, root: Path) -> tuple[set[str], dict[str, Path]]:
    """Config hashes that FINISHED, and the folders of runs that did not but left a checkpoint of
    their config. Only folders under ``root`` (the grid's own output) are resumed from: a run's
    ``run_dir`` tag is writable by anyone who can write to the store. An unfinished run with
    nothing to resume from is closed as KILLED, so the relaunch's new run does not sit beside a
    RUNNING one; a run whose folder's owner still trains it stops the relaunch."""
    client = store.client(uri)
    exp_id = store.ensure_experiment(uri, experiment)  # create store + experiment before any job
    root = root.resolve()
    finished, unfinished = set(), {}
    for r in client.search_runs([exp_id], max_results=50_000, order_by=["attributes.start_time ASC"]):
        h, run_dir = r.data.tags.get(T.CONFIG_HASH), Path(r.data.tags.get(T.RUN_DIR, "-")).resolve()
        if r.info.status == "FINISHED":
            finished.add(h)
            continue
        if not run_dir.is_relative_to(root):
            continue
        owner = ownership.owner_of(run_dir)
        if owner is not None and owner.alive():
            raise ownership.RunFolderBusy(ownership.busy_message(run_dir, owner))
        if checkpoints.find_latest(run_dir, h) is not None:
            unfinished[h] = run_dir
        elif r.info.status in ("RUNNING", "SCHEDULED"):
            reason = "killed before a checkpoint it could resume from; the grid's relaunch runs it again"
            store.close_abandoned(uri, r.info.run_id, reason)
    return finished, unfinished


def run_grid(
    name: str, overrides: list[str], jobs: int = 1, gpus: list[str] | None = None, wait: bool = True
) -> list[str]:
    """Launch a grid (its folder: one sub-folder per run with its log and checkpoints); return the
    runs that failed, as "ARM seed=N". On Slurm, ``wait=False`` returns once the job array is
    submitted."""
    cfg = compose_grid(name, overrides)
    launcher = get_launcher(cfg, jobs=jobs, gpus=gpus)
    overrides = [*overrides, *launcher.run_overrides()]  # every run fits its job's allocation
    grid_jobs = expand(name, cfg, overrides)
    root = Path("multirun") / cfg.ablation
    with_budget(cfg, grid_jobs, root)
    finished, unfinished = _previous_runs(cfg.tracking.uri, cfg.tracking.experiment, root)
    grid_dir = stamped(root)
    for job in grid_jobs:
        h = job_hash(job)
        job.status = "skipped" if h in finished else "pending"
        job.run_dir = unfinished.get(h, grid_dir / str(job.index))
    todo = [j for j in grid_jobs if j.status == "pending"]
    if todo:  # tokenize once here rather than in every run at once
        tokenize_corpus(cfg.data)
    resumed = sum(j.run_dir != grid_dir / str(j.index) for j in todo)
    print(f"grid '{name}': {len(grid_jobs)} runs, {len(grid_jobs) - len(todo)} already finished, "
          f"{resumed} resuming from a checkpoint -> {grid_dir}")  # fmt: skip
    return _launch(cfg, launcher, todo, grid_dir, wait or launcher.name == "local", kind="grid")


def submit_run(cfg: DictConfig, overrides: list[str]) -> None:
    """``lab train OVERRIDES`` with a Slurm profile: one job, sent as a grid of one so that
    ``lab status ABLATION`` and resuming work as for grids."""
    launcher = get_launcher(cfg)
    overrides = [*overrides, *launcher.run_overrides()]
    root = Path("multirun") / cfg.ablation
    finished, unfinished = _previous_runs(cfg.tracking.uri, cfg.tracking.experiment, root)
    arm = " ".join(o for o in overrides if not o.startswith(("cluster", "trainer.", "seed="))) or "(defaults)"
    grid_dir = stamped(root)
    job = Job(0, arm, int(cfg.seed), overrides, run_dir=grid_dir / "0")
    h = job_hash(job)
    if h in finished:
        print(f"this config already FINISHED in experiment '{cfg.tracking.experiment}' (config_hash {h})")
        return
    job.run_dir = unfinished.get(h, job.run_dir)
    if job.run_dir != grid_dir / "0":
        print(f"resuming the unfinished run in {job.run_dir} from its checkpoint")
    tokenize_corpus(cfg.data)
    _launch(cfg, launcher, [job], grid_dir, wait=False, kind="run")


RUN_TASK = f"{__name__}:run_task"  # what each job of a grid calls, named for the launcher


def _launch(cfg: DictConfig, launcher: Launcher, todo: list[Job], grid_dir: Path, wait: bool,
            kind: str) -> list[str]:  # fmt: skip
    if not todo:
        return []
    calls = [([*j.overrides, "trainer.progress_bar=false"], str(j.run_dir.resolve())) for j in todo]
    task = Task(RUN_TASK, calls, [j.label for j in todo], [str(j.run_dir) for j in todo],
                f"lab-{cfg.ablation}", cfg.trainer.requeue_signal)  # fmt: skip
    ended = launching.launch(cfg, launcher, task, grid_dir, kind, cfg.ablation, wait)
    failed = [
        (job, s, state) for job, (s, state) in zip(todo, ended or [], strict=False) if state != COMPLETED
    ]
    for job, submitted, state in failed:
        _record_failure(cfg, job, state)
        why = (
            _last_error(Path(submitted.log)) if launcher.name == "local" else f"{launcher.name} state {state}"
        )
        print(f"failed: {submitted.label}: {why} (log: {submitted.log})")
    return [submitted.label for _, submitted, _ in failed]


def run_task(overrides: list[str], run_dir: str) -> None:
    """One grid run, in its job: the config ``lab train OVERRIDES`` would compose, trained into
    ``run_dir``. Its errors end the process the way ``lab train``'s do, in one line of its log."""
    quiet()
    cfg = compose_run(overrides)
    tags = {}
    if slurm.in_job():
        signals.install(cfg.trainer.requeue_signal)  # takes over from TaskEntry's hold
        slurm.link_logs(Path(run_dir))
        tags = {T.JOB_ID: slurm.job_id()}
    try:
        result = train(cfg, Path(run_dir), overrides, tags)
    except preemption.Requeued:
        os._exit(0)  # Slurm starts the job again; submitit must not record this attempt as its result
    except (*USER_ERRORS, TrainingDiverged) as e:
        diverged = isinstance(e, TrainingDiverged)
        print(f"{'run failed' if diverged else 'error'}: {one_line(e)}", file=sys.stderr)
        sys.exit(1 if diverged else 2)
    print_summary(cfg, Path(run_dir), result)


def _last_error(log: Path) -> str:
    lines = (
        [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        if log.exists()
        else []
    )
    flagged = [line for line in lines if line.startswith(("error:", "run failed:"))]
    return (flagged or lines or ["no output"])[-1]


def _record_failure(cfg: DictConfig, job: Job, state: str) -> None:
    """A run that exited non-zero: one killed hard (signal, OOM) cannot mark itself FAILED, so do
    it for it; one that failed before its MLflow run existed gets a FAILED run with the reason, so
    the comparison lists it instead of leaving its arm silently short."""
    uri, experiment = cfg.tracking.uri, cfg.tracking.experiment
    client = store.client(uri)
    exp_id = store.ensure_experiment(uri, experiment)
    query = f"tags.`{T.RUN_DIR}` = '{job.run_dir.resolve()}'"
    runs = client.search_runs([exp_id], query)
    for run in runs:
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, T.FAILURE_REASON, f"job ended {state}")
            client.set_terminated(run.info.run_id, "FAILED")
    if runs:
        return
    reason = _last_error(job.run_dir / "log.txt")
    tags = {T.ABLATION: cfg.ablation, T.ARM: job.arm, T.BASELINE: cfg.grid.get("baseline") or "",
            T.RUN_DIR: str(job.run_dir.resolve()), T.FAILURE_REASON: reason}  # fmt: skip
    name = store.run_name(cfg.ablation, job.arm, job.seed)
    params = {"seed": job.seed, **({"grid.size": job.size} if job.size else {})}
    store.record_failed_run(uri, experiment, name, tags, params)
