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
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

from components.registry import require, spec_error
from research import metrics as M
from research import preemption, slurm
from research.grid import REPO_ROOT, compose_run, named_files
from research.redaction import redact
from research.slurm_entry import SlurmEntry

CONF_DIR = Path(__file__).resolve().parent / "conf"
DIRECTIONS = ("minimize", "maximize")
SAMPLERS = ("tpe", "random", "grid", "nsga2", "nsga3", "gp")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
SPACE_TYPES = ("float", "int", "categorical")


def sweep_dirs() -> list[Path]:
    return [d for d in (Path.cwd() / "sweeps", REPO_ROOT / "sweeps") if d.is_dir()]


def available() -> list[str]:
    return named_files("sweeps")


@dataclass
class SweepSpec:
    name: str
    objectives: list[tuple[str, str]]  # (metric, direction)
    space: dict[str, dict[str, Any]]
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    n_trials: int
    timeout: float | None
    overrides: list[str]  # fixed for every trial
    storage: str
    experiment: str
    enqueue: list[dict[str, Any]] = field(default_factory=list)

    @property
    def directions(self) -> list[str]:
        return [d for _, d in self.objectives]


def load_spec(
    name: str, overrides: list[str] = (), n_trials: int | None = None, storage: str | None = None
) -> SweepSpec:
    """Read and check ``sweeps/NAME.yaml``; every problem is a one-line ValueError naming the key."""
    path = next((d / f"{name}.yaml" for d in sweep_dirs() if (d / f"{name}.yaml").exists()), None)
    if path is None:
        raise spec_error("sweep", name, available())
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    known = {"study", "objectives", "space", "sampler", "pruner", "budget", "overrides", "storage", "enqueue"}
    for key in raw:
        require(key in known, f"sweep.{key}", raw[key], ", ".join(sorted(known)))
    objectives = []
    for i, o in enumerate(raw.get("objectives") or []):
        require(o.get("metric") in M.ALL, f"objectives[{i}].metric", o.get("metric"), ", ".join(M.ALL))
        require(
            o.get("direction") in DIRECTIONS,
            f"objectives[{i}].direction",
            o.get("direction"),
            "minimize, maximize",
        )
        objectives.append((o["metric"], o["direction"]))
    require(bool(objectives), "objectives", None, "a list of {metric, direction}")
    space = raw.get("space") or {}
    require(bool(space), "space", space, "a mapping of config keys to {type, ...}")
    for key, s in space.items():
        _check_dimension(key, s)
    sampler = raw.get("sampler") or {"name": "tpe"}
    pruner = raw.get("pruner") or {"name": "none"}
    require(sampler.get("name") in SAMPLERS, "sampler.name", sampler.get("name"), ", ".join(SAMPLERS))
    require(pruner.get("name") in PRUNERS, "pruner.name", pruner.get("name"), ", ".join(PRUNERS))
    if len(objectives) > 1:
        require(
            pruner["name"] == "none",
            "pruner.name",
            pruner["name"],
            "none (Optuna prunes single-objective studies only)",
        )
    if sampler["name"] == "grid":
        require(all(s["type"] == "categorical" for s in space.values()), "sampler.name", "grid",
                "a space of categoricals only")  # fmt: skip
    budget = raw.get("budget") or {}
    trials = budget.get("n_trials") if n_trials is None else n_trials
    key = "budget.n_trials" if n_trials is None else "--trials"
    require(isinstance(trials, int) and trials >= 1, key, trials, "a positive integer")
    storage = storage or raw.get("storage") or "sqlite:///optuna.db"
    _check_storage(storage)
    study = raw.get("study") or name
    return SweepSpec(
        name=study,
        objectives=objectives,
        space=space,
        sampler=sampler,
        pruner=pruner,
        n_trials=trials,
        timeout=budget.get("timeout"),
        overrides=[*(raw.get("overrides") or []), *overrides],
        storage=storage,
        experiment=f"sweep_{study}",
        enqueue=raw.get("enqueue") or [],
    )


def _check_storage(url: str) -> None:
    """A URL Optuna cannot open fails here in one line, not as an ImportError from its RDB layer."""
    allowed = (
        "sqlite:///FILE.db, postgresql://USER@HOST/DB, journal:PATH, or an RDB URL whose driver is installed"
    )
    if url.startswith("journal:"):
        require(url != "journal:", "storage", url, allowed)
        return
    from sqlalchemy.engine import make_url

    try:
        make_url(url).get_dialect().import_dbapi()
    except Exception as e:
        raise spec_error("storage", redact(url), redact(f"{allowed} ({type(e).__name__}: {e})")) from None


def _check_dimension(key: str, s: dict[str, Any]) -> None:
    where = f"space.{key}"
    require(
        isinstance(s, dict) and s.get("type") in SPACE_TYPES,
        f"{where}.type",
        (s or {}).get("type"),
        ", ".join(SPACE_TYPES),
    )
    if s["type"] == "categorical":
        choices = s.get("choices") or []
        require(len(choices) >= 1, f"{where}.choices", choices, "a non-empty list")
        group = CONF_DIR / key
        if "." not in key and group.is_dir():  # a component axis: each choice must be a config file
            allowed = sorted(p.stem for p in group.glob("*.yaml"))
            for c in choices:
                require(str(c) in allowed, f"{where}.choices", c, ", ".join(allowed))
        return
    low, high = s.get("low"), s.get("high")
    require(
        isinstance(low, int | float) and isinstance(high, int | float),
        f"{where}.low",
        low,
        "numbers low and high",
    )
    require(low < high, f"{where}.low", low, f"less than high={high}")
    if s.get("log"):
        require(low > 0, f"{where}.low", low, "> 0 with log: true")
    if s["type"] == "int":
        require(int(s.get("step", 1)) >= 1, f"{where}.step", s.get("step"), "a positive integer")


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


def corner_overrides(space: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Overrides that set every key of the space at once, at each end of its range (each choice of
    a categorical in turn): composing them before the study exists catches a key no config has
    (``balance.gamm``), where every trial would otherwise fail."""
    ends = {
        k: s["choices"] if s["type"] == "categorical" else [s["low"], s["high"]] for k, s in space.items()
    }
    widest = max(len(v) for v in ends.values())
    return [[f"{k}={v[min(i, len(v) - 1)]}" for k, v in ends.items()] for i in range(widest)]


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
    from mlflow import MlflowClient

    from research.train import train

    cfg, overrides = _trial_config(spec, sample(trial, spec.space))
    tags = {"mlflow.parentRunId": parent_run_id, "optuna.study": spec.name, "optuna.trial": str(trial.number)}
    if preemption.on_slurm():
        tags.update(slurm.slurm_tags())
    reporter = ReportToTrial(trial, spec.objectives[0][0])
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    try:
        result = train(cfg, out_dir / f"trial_{trial.number}", overrides, tags, callbacks=[reporter])
    except BaseException as e:
        if reporter.run_id:
            trial.set_user_attr("mlflow_run_id", reporter.run_id)
            pruned = isinstance(e, optuna.TrialPruned)
            client.set_tag(reporter.run_id, "optuna.state", "PRUNED" if pruned else "FAIL")
            # Pruned: stopped on purpose, not a failure. Requeued: the worker restarts with new trials.
            if pruned or isinstance(e, preemption.Requeued):
                client.set_terminated(reporter.run_id, "KILLED")
        elif not isinstance(e, optuna.TrialPruned | preemption.Requeued):
            trial.set_user_attr("mlflow_run_id", _record_failed_start(client, cfg, tags, e))
        raise
    trial.set_user_attr("mlflow_run_id", result.run_id)
    client.set_tag(result.run_id, "optuna.state", "COMPLETE")
    missing = [m for m, _ in spec.objectives if m not in result.metrics]
    require(
        not missing, "objectives", missing, "metrics this run logs (perf/mfu needs a GPU with a known peak)"
    )
    return [result.metrics[m] for m, _ in spec.objectives]


def _record_failed_start(client: Any, cfg: Any, tags: dict[str, str], e: BaseException) -> str:
    """A trial that failed before its MLflow run existed (a setting the data refuses) gets a FAILED
    run with the reason, so the sweep's runs list it beside the others."""
    from research.cli import one_line
    from research.tracking import ensure_experiment

    exp_id = ensure_experiment(cfg.tracking.uri, cfg.tracking.experiment)
    failed = {**tags, "optuna.state": "FAIL", "failure_reason": one_line(e)[:5000]}
    run = client.create_run(exp_id, run_name=f"trial {tags['optuna.trial']}", tags=failed)
    client.set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id


def _worker(spec: SweepSpec, worker: int, n_trials: int, parent_run_id: str, out_dir: Path) -> None:
    from research.cli import quiet

    quiet()  # a spawned worker starts from a fresh interpreter
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(spec, worker)
    # A worker requeued by Slurm starts over with its quota: the study's budget is the bound.
    enough = optuna.study.MaxTrialsCallback(spec.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
    study.optimize(lambda t: objective(t, spec, parent_run_id, out_dir), n_trials=n_trials,
                   timeout=spec.timeout, catch=(Exception,), callbacks=[enough])  # fmt: skip


def _slurm_worker(spec: SweepSpec, worker: int, n_trials: int, parent_run_id: str, out_dir: Path) -> None:
    """A sweep worker as a Slurm array task."""
    cfg, _ = _trial_config(spec, [])
    preemption.install(cfg.trainer.requeue_signal)
    try:
        _worker(spec, worker, n_trials, parent_run_id, out_dir)
    except preemption.Requeued:
        os._exit(0)  # Slurm starts the worker again; submitit must not record this attempt


def _fail_stale(study: optuna.Study) -> None:
    """Trials left RUNNING by a sweep that was stopped: FAIL, so the budget runs them again."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def _parent_run(spec: SweepSpec, uri: str) -> str:
    from mlflow import MlflowClient

    from research.tracking import ensure_experiment

    client = MlflowClient(tracking_uri=uri)
    exp_id = ensure_experiment(uri, spec.experiment)
    found = client.search_runs([exp_id], f"tags.`lab.kind` = 'sweep' and tags.`optuna.study` = '{spec.name}'")
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(
        exp_id, run_name=f"sweep {spec.name}", tags={"lab.kind": "sweep", "optuna.study": spec.name}
    )
    client.log_param(run.info.run_id, "storage", redact(spec.storage))
    return run.info.run_id


def _submit_workers(spec: SweepSpec, cfg: Any, quotas: list[int], parent: str, out_dir: Path,
                    wait: bool) -> bool:  # fmt: skip
    """Send the workers to Slurm as one job array; True once they ended (``wait``). Without
    ``wait``, a job that starts once the whole array ended writes the report and closes the parent
    run, so the record is complete without anyone coming back."""
    quotas = [q for q in quotas if q]
    if not quotas:
        return True
    folder = out_dir / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    folder.mkdir(parents=True, exist_ok=True)
    executor = slurm.make_executor(cfg.cluster, folder / "slurm", f"lab-sweep-{spec.name}",
                                   cfg.trainer.requeue_signal)  # fmt: skip
    n = len(quotas)
    worker = SlurmEntry("research.sweep:_slurm_worker", cfg.trainer.requeue_signal)
    with slurm.sbatch_refusal(cfg.cluster):
        jobs = executor.map_array(worker, [spec] * n, list(range(n)), quotas, [parent] * n, [out_dir] * n)
    submitted = [
        slurm.Submitted(i, f"worker {i}: {q} trials", job.job_id, str(out_dir), str(job.paths.stdout))
        for i, (q, job) in enumerate(zip(quotas, jobs, strict=True))
    ]
    if not wait:
        report = _submit_report_job(spec, cfg, parent, folder, array_id=jobs[0].job_id.split("_")[0])
        submitted.append(slurm.Submitted(n, "report", report.job_id, str(out_dir), str(report.paths.stdout)))
    record = slurm.write_record(folder, "sweep", spec.name, cfg.cluster.name, submitted)
    print(f"submitted {n} worker(s) on '{cfg.cluster.name}'; record {record}; see `lab status {spec.name}`")
    if not wait:
        print(f"job {submitted[-1].job_id} writes the report and closes the sweep's run once they ended")
        return False
    slurm.wait([s.job_id for s in submitted])
    return True


def _submit_report_job(spec: SweepSpec, cfg: Any, parent: str, folder: Path, array_id: str) -> Any:
    """One small job after every task of the workers' array ended (``afterany``: a requeued task is
    not ended), on the profile's partition without its GPUs."""
    profile = OmegaConf.merge(cfg.cluster, {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1,
                                            "sbatch": [*(cfg.cluster.sbatch or []),
                                                       f"--dependency=afterany:{array_id}"]})  # fmt: skip
    executor = slurm.make_executor(profile, folder / "slurm", f"lab-sweep-{spec.name}-report",
                                   cfg.trainer.requeue_signal)  # fmt: skip
    entry = SlurmEntry("research.sweep:report", cfg.trainer.requeue_signal)
    with slurm.sbatch_refusal(profile):
        return executor.submit(entry, spec, parent, cfg.tracking.uri)


def report(spec: SweepSpec, parent: str, uri: str) -> Path:
    """The study's report under reports/EXPERIMENT/, and the sweep's parent run FINISHED."""
    from research.sweep_report import report_sweep

    out = Path("reports") / spec.experiment / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    report_sweep(open_study(spec), spec, uri, parent, out)
    return out


def run_sweep(spec: SweepSpec, workers: int = 1, wait: bool = True) -> optuna.Study:
    """Create or resume the study, run its remaining budget on ``workers`` processes (or Slurm
    jobs, with a Slurm ``cluster`` profile), report."""
    cfg, _ = _trial_config(spec, [])
    if slurm.launcher(cfg) == "slurm":
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
    if slurm.launcher(cfg) == "slurm":
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
