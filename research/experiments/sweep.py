"""Optuna sweeps: one YAML per study in ``sweeps/``, every trial through the same ``train()``.

A sweep file names its objectives (metrics from ``research.metrics`` with directions), a search
space over config keys (floats, ints, categoricals, component choices such as ``attention``), a
sampler, a pruner, a budget and fixed overrides. Each trial composes the Hydra config with its
sampled overrides and trains; ``val/bpb`` is reported at every evaluation so the pruner can stop
poor trials early. The study lives in Optuna storage (SQLite by default, any RDB URL, or
``journal:PATH`` for Optuna's journal file on a shared filesystem): launching a sweep again resumes
it, and ``--workers N`` runs N processes on the same study.

In MLflow a sweep is a parent run (tag ``lab.kind=sweep``) and each trial a child run with its
trial number and final state (COMPLETE / PRUNED / FAIL); the parent gets the best trial (or the
Pareto set) and the report.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import lightning as L
import optuna
from optuna.trial import TrialState

from components.registry import require
from research import signals
from research.config.compose import compose_run
from research.experiments import launching
from research.experiments.sweep_report import report_sweep
from research.experiments.sweep_spec import SweepSpec
from research.launch import Task, get_launcher, launcher_name, slurm
from research.runtime import one_line, quiet, redact, stamped
from research.tracking import store
from research.tracking import tags as T
from research.tracking.store import ensure_experiment
from research.training import preemption
from research.training.run import train

# --- Optuna objects ----------------------------------------------------------------------------


def make_storage(url: str) -> str | optuna.storages.BaseStorage:
    """An RDB URL as is; ``journal:PATH`` as Optuna's journal file (for shared filesystems)."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    return url


def make_sampler(spec: SweepSpec, worker: int = 0) -> optuna.samplers.BaseSampler:
    s = dict(spec.sampler)
    name = s.pop("name")
    if "seed" in s and s["seed"] is not None:
        s["seed"] = int(s["seed"]) + worker  # workers must not draw the same points
    if name == "grid":
        return optuna.samplers.GridSampler({k: v["choices"] for k, v in spec.space.items()}, **s)
    classes = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
               "nsga2": optuna.samplers.NSGAIISampler, "nsga3": optuna.samplers.NSGAIIISampler,
               "gp": optuna.samplers.GPSampler}  # fmt: skip
    return classes[name](**s)


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    p = dict(spec.pruner)
    name = p.pop("name")
    classes = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
               "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
               "hyperband": optuna.pruners.HyperbandPruner}  # fmt: skip
    return classes[name](**p)


def open_study(spec: SweepSpec, worker: int = 0) -> optuna.Study:
    return optuna.create_study(
        study_name=spec.name,
        storage=make_storage(spec.storage),
        sampler=make_sampler(spec, worker),
        pruner=make_pruner(spec),
        directions=spec.directions,
        load_if_exists=True,
    )


def sample(trial: optuna.Trial, space: dict[str, dict[str, Any]]) -> list[str]:
    """The trial's config overrides, one per dimension of the space."""
    out = []
    for key, s in space.items():
        if s["type"] == "float":
            value = trial.suggest_float(key, s["low"], s["high"], log=bool(s.get("log")))
        elif s["type"] == "int":
            value = trial.suggest_int(
                key, s["low"], s["high"], step=int(s.get("step", 1)), log=bool(s.get("log"))
            )
        else:
            value = trial.suggest_categorical(key, s["choices"])
        out.append(f"{key}={value}")
    return out


class ReportToTrial(L.Callback):
    """Reports the monitored metric to the trial after every evaluation, at the training step, and
    prunes. (optuna-integration's Lightning callback reports per epoch; our runs evaluate every N
    steps inside one endless epoch, so its reports would all land on step 0.)"""

    def __init__(self, trial: optuna.Trial, monitor: str):
        self.trial, self.monitor = trial, monitor
        self.run_id: str | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run_id = trainer.logger.run_id

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or trainer.sanity_checking or len(self.trial.study.directions) > 1:
            return  # Optuna takes intermediate values (and prunes) for single-objective studies only
        self.trial.report(float(value), step=trainer.global_step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(
                f"pruned at step {trainer.global_step} with {self.monitor}={float(value):.4f}"
            )


# --- running ---------------------------------------------------------------------------------


def _trial_config(spec: SweepSpec, trial_overrides: list[str]):
    overrides = [*spec.overrides, *trial_overrides, f"tracking.experiment={spec.experiment}"]
    return compose_run(overrides), overrides


def objective(trial: optuna.Trial, spec: SweepSpec, parent_run_id: str, out_dir: Path) -> list[float]:

    cfg, overrides = _trial_config(spec, sample(trial, spec.space))
    tags = {T.PARENT_RUN: parent_run_id, T.STUDY: spec.name, T.TRIAL: str(trial.number)}
    if slurm.in_job():
        tags[T.JOB_ID] = slurm.job_id()
    reporter = ReportToTrial(trial, spec.objectives[0][0])
    client = store.client(cfg.tracking.uri)
    try:
        result = train(cfg, out_dir / f"trial_{trial.number}", overrides, tags, callbacks=[reporter])
    except BaseException as e:
        if reporter.run_id:
            trial.set_user_attr("mlflow_run_id", reporter.run_id)
            pruned = isinstance(e, optuna.TrialPruned)
            client.set_tag(reporter.run_id, T.TRIAL_STATE, "PRUNED" if pruned else "FAIL")
            # Pruned: stopped on purpose, not a failure. Requeued: the worker restarts with new trials.
            if pruned or isinstance(e, preemption.Requeued):
                client.set_terminated(reporter.run_id, "KILLED")
        elif not isinstance(e, optuna.TrialPruned | preemption.Requeued):
            trial.set_user_attr("mlflow_run_id", _record_failed_start(cfg, tags, e))
        raise
    trial.set_user_attr("mlflow_run_id", result.run_id)
    client.set_tag(result.run_id, T.TRIAL_STATE, "COMPLETE")
    missing = [m for m, _ in spec.objectives if m not in result.metrics]
    require(
        not missing, "objectives", missing, "metrics this run logs (perf/mfu needs a GPU with a known peak)"
    )
    return [result.metrics[m] for m, _ in spec.objectives]


def _record_failed_start(cfg: Any, tags: dict[str, str], e: BaseException) -> str:
    """A trial that failed before its MLflow run existed (a setting the data refuses): a FAILED run
    with the reason, listed beside the sweep's others."""
    failed = {**tags, T.TRIAL_STATE: "FAIL", T.FAILURE_REASON: one_line(e)[:5000]}
    return store.record_failed_run(
        cfg.tracking.uri, cfg.tracking.experiment, f"trial {tags[T.TRIAL]}", failed
    )


def _worker(spec: SweepSpec, worker: int, n_trials: int, parent_run_id: str, out_dir: Path) -> None:

    quiet()  # a spawned worker starts from a fresh interpreter
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(spec, worker)
    # A worker requeued by Slurm starts over with its quota: the study's budget is the bound.
    enough = optuna.study.MaxTrialsCallback(spec.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
    study.optimize(lambda t: objective(t, spec, parent_run_id, out_dir), n_trials=n_trials,
                   timeout=spec.timeout, catch=(Exception,), callbacks=[enough])  # fmt: skip


def slurm_worker(spec: SweepSpec, worker: int, n_trials: int, parent_run_id: str, out_dir: Path) -> None:
    """A sweep worker as a Slurm array task."""
    cfg, _ = _trial_config(spec, [])
    signals.install(cfg.trainer.requeue_signal)
    try:
        _worker(spec, worker, n_trials, parent_run_id, out_dir)
    except preemption.Requeued:
        os._exit(0)  # Slurm starts the worker again; submitit must not record this attempt


def _fail_stale(study: optuna.Study) -> None:
    """Trials left RUNNING by a sweep that was stopped: FAIL, so the budget runs them again."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def _parent_run(spec: SweepSpec, uri: str) -> str:

    client = store.client(uri)
    exp_id = ensure_experiment(uri, spec.experiment)
    found = client.search_runs([exp_id], f"tags.`{T.KIND}` = 'sweep' and tags.`{T.STUDY}` = '{spec.name}'")
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"sweep {spec.name}", tags={T.KIND: "sweep", T.STUDY: spec.name})
    client.log_param(run.info.run_id, "storage", redact(spec.storage))
    return run.info.run_id


WORKER = f"{__name__}:slurm_worker"  # what each worker job calls, named for the launcher
REPORT = f"{__name__}:report"


def _submit_workers(spec: SweepSpec, cfg: Any, quotas: list[int], parent: str, out_dir: Path,
                    wait: bool) -> bool:  # fmt: skip
    """Send the workers out as one job array; True once they ended (``wait``). Without ``wait``, a
    small job that starts once every worker ended writes the report and closes the parent run, so
    the record is complete without anyone coming back."""
    quotas = [q for q in quotas if q]
    if not quotas:
        return True
    n, signal = len(quotas), cfg.trainer.requeue_signal
    workers = Task(WORKER, [(spec, i, q, parent, out_dir) for i, q in enumerate(quotas)],
                   [f"worker {i}: {q} trials" for i, q in enumerate(quotas)], [str(out_dir)] * n,
                   f"lab-sweep-{spec.name}", signal)  # fmt: skip
    # The report needs the partition, not the workers' GPUs.
    report_job = Task(REPORT, [(spec, parent, cfg.tracking.uri)], ["report"], [str(out_dir)],
                      f"lab-sweep-{spec.name}-report", signal,
                      resources={"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1})  # fmt: skip
    launcher = get_launcher(cfg)
    launching.launch(cfg, launcher, workers, stamped(out_dir), "sweep", spec.name, wait,
                     then=None if wait else report_job)  # fmt: skip
    if not wait:
        print("a job writes the report and closes the sweep's run once the workers ended")
    return wait


def report(spec: SweepSpec, parent: str, uri: str) -> Path:
    """The study's report under reports/EXPERIMENT/, and the sweep's parent run FINISHED."""

    out = stamped(Path("reports") / spec.experiment)
    report_sweep(open_study(spec), spec, uri, parent, out)
    return out


def run_sweep(spec: SweepSpec, workers: int = 1, wait: bool = True) -> optuna.Study:
    """Create or resume the study, run its remaining budget on ``workers`` processes (or Slurm
    jobs, with a Slurm ``cluster`` profile), report."""
    cfg, _ = _trial_config(spec, [])
    if launcher_name(cfg) != "local":
        require(not spec.storage.startswith("sqlite"), "storage", spec.storage,
                "postgresql://... or journal:PATH on a shared folder for Slurm workers (SQLite on a "
                "network filesystem locks up or corrupts under several writers)")  # fmt: skip
    study = open_study(spec)
    _fail_stale(study)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    if not study.trials:
        for params in spec.enqueue:
            study.enqueue_trial(params)
    remaining = max(0, spec.n_trials - done)
    parent = _parent_run(spec, cfg.tracking.uri)
    out_dir = Path("sweeps_out") / spec.name
    print(f"sweep '{spec.name}': {done} of {spec.n_trials} trials done, {remaining} to run on {workers} "
          f"worker(s) (storage {redact(spec.storage)}, MLflow experiment {spec.experiment})")  # fmt: skip
    quotas = [remaining // workers + (i < remaining % workers) for i in range(workers)]
    if launcher_name(cfg) != "local":
        if not _submit_workers(spec, cfg, quotas, parent, out_dir, wait):
            return open_study(spec)
    elif workers == 1:
        if remaining:
            _worker(spec, 0, remaining, parent, out_dir)
    else:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each: no shared torch state
        procs = [
            ctx.Process(target=_worker, args=(spec, i, q, parent, out_dir)) for i, q in enumerate(quotas) if q
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    report(spec, parent, cfg.tracking.uri)
    return open_study(spec)
