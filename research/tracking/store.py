"""MLflow: where runs are recorded, what each run carries, and how a failure is written down.

Every run gets the flattened config as params (``model.d_model``, the same keys as Hydra
overrides), tags for the ablation, its overrides, a config hash (so a grid can skip what already
finished), the git revision and its run folder, and the resolved config as an artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from research.errors import TrackingError
from research.runtime import redact
from research.tracking import tags as T

# Keys that change where or how a run is recorded, not what it computes.
# ``eval``: measured after training, from the checkpoint; ``lab decode-bench RUN --log`` adds it later.
_NOT_HASHED = ("tracking", "cluster", "resume", "ablation", "grid", "eval", "trainer.progress_bar",
               "trainer.requeue_signal", "data.cache_dir")  # fmt: skip


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def hashed_items(cfg: DictConfig) -> dict[str, Any]:
    """The flattened keys that determine what a run computes (seed included)."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    return {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in _NOT_HASHED)}


def config_hash(cfg: DictConfig) -> str:
    """Hash of everything that determines what a run computes."""
    kept = hashed_items(cfg)
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_revision() -> str:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextmanager
def _fail_fast_http():
    """MLflow retries an unreachable server for minutes by default; a pre-flight check should not."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ensure_experiment(uri: str, name: str) -> str:
    """Check the store answers and return the experiment id, creating it if needed."""
    from mlflow.exceptions import MlflowException

    local = uri.startswith("sqlite:///")
    with _fail_fast_http(), _store_lock(uri):
        try:
            client = MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            try:
                return client.create_experiment(name)
            except MlflowException:  # created meanwhile by a parallel run
                return client.get_experiment_by_name(name).experiment_id
        except Exception as e:
            reason = " ".join(str(e).split())
            # A connection failure's cause sits deep in urllib3's retry message: keep only it.
            errno = re.search(r"\[Errno -?\d+\] [^'\")]+", reason)
            reason = errno.group(0) if errno else reason
            problem = "could not be opened" if local else "is unreachable"
            raise TrackingError(f"tracking.uri='{redact(uri)}' {problem}: {reason}") from e


@contextmanager
def _store_lock(uri: str):
    """Several runs started at once into a SQLite store that does not exist yet all create its
    tables, and MLflow's migrations race ("duplicate column name"): the first creates, under a
    file lock beside the database, while the others wait."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    db = Path(uri.removeprefix("sqlite:///")).expanduser()
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock", timeout=600):
        yield


class OnceAStepLogger(MLFlowLogger):
    """Lightning's MLflow logger, recording each metric once per step. A checkpoint (or a requeue)
    sends its step's metrics before it is written (``research.training.callbacks.send_step_metrics``), so a
    run killed right after it resumes with nothing missing; Lightning's own later send of the same
    step is dropped here."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._step: int | None = None
        self._sent: set[str] = set()  # metrics recorded at self._step
        self._recorded: dict[str, int] = {}  # metric -> last step a resumed run had recorded

    @rank_zero_only
    def keep_recorded(self) -> None:
        """A resumed run: the steps from its checkpoint to where it was killed were recorded
        already, and are logged again by the resumed attempt. Keep the first record of each."""
        client = self.experiment
        for key in client.get_run(self.run_id).data.metrics:
            self._recorded[key] = max(m.step for m in client.get_metric_history(self.run_id, key))

    requeued = False  # set when Slurm requeued the job: the run waits as SCHEDULED

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        # Requeued is raised inside fit, and Lightning's interrupt handling then finalizes the
        # run as failed; it is waiting for its next job, as RequeueOnSignal marked it.
        if not (self.requeued and status == "failed"):
            super().finalize(status)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if step is None:
            return super().log_metrics(metrics, step)
        if step != self._step:
            self._step, self._sent = step, set()
        fresh = {k: v for k, v in metrics.items() if k not in self._sent and step > self._recorded.get(k, -1)}
        self._sent.update(fresh)
        if fresh:
            super().log_metrics(fresh, step)


def run_name(ablation: str, arm: str, seed: int) -> str:
    """A run's MLflow name: what it is, not MLflow's random words (which repeat for every run of
    one seed, seeding having come first)."""
    what, seed_part = f"{ablation}: {arm}", f" seed={seed}"
    room = 250 - len(seed_part)  # MLflow's limit on a run name; the seed is kept whole
    return (what if len(what) <= room else what[: room - 3] + "...") + seed_part


def make_logger(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str],
    run_id: str | None,
    extra_tags: dict[str, str] | None = None,
) -> OnceAStepLogger:
    """The run's logger: a new MLflow run, or ``run_id`` continued after a resume. ``overrides``
    are the command-line overrides that made this run (tagged, their keys as ``swept_keys``)."""
    t = cfg.tracking  # the store and experiment exist: train() checked them before anything else
    grid = cfg.get("grid") or {}
    arm = grid.get("arm") or " ".join(o for o in overrides if o.split("=", 1)[0] not in ("seed", "ablations"))
    tags = {
        T.ABLATION: cfg.ablation,
        T.ARM: redact(arm) or "(defaults)",
        T.BASELINE: grid.get("baseline") or "",
        "overrides": redact(" ".join(overrides)) or "(defaults)",
        "swept_keys": ",".join(sorted(o.split("=", 1)[0].lstrip("+~") for o in overrides)),
        T.CONFIG_HASH: config_hash(cfg),
        T.GRID_BASE: str(grid.get("base") or ""),  # runs of one launch share it: lab compare groups by it
        T.GIT_REVISION: git_revision(),
        T.RUN_DIR: str(run_dir),
        **(extra_tags or {}),
    }
    name = t.get("run_name") or run_name(cfg.ablation, tags[T.ARM], cfg.seed)
    logger = OnceAStepLogger(experiment_name=t.experiment, run_name=name, tracking_uri=t.uri,
                          tags=tags if run_id is None else None, run_id=run_id)  # fmt: skip
    if run_id is None:
        params = flatten(OmegaConf.to_container(cfg, resolve=True))
        logger.log_hyperparams({k: redact(v) if isinstance(v, str) else v for k, v in params.items()})
        _record_config(logger, cfg, run_dir)
    else:
        _reopen(logger.experiment, run_id, {**(extra_tags or {}), T.CONFIG_HASH: tags[T.CONFIG_HASH]})
        _record_config(logger, cfg, run_dir)  # as it continues: a resume may have extended it
        logger.keep_recorded()
    return logger


@rank_zero_only
def _record_config(logger: MLFlowLogger, cfg: DictConfig, run_dir: Path) -> None:
    """``config.yaml`` in the run folder and as the run's artifact (passwords masked)."""
    config_file = run_dir / "config.yaml"
    config_file.write_text(redact(OmegaConf.to_yaml(cfg, resolve=True)))
    logger.experiment.log_artifact(logger.run_id, str(config_file))


@rank_zero_only
def _reopen(client: Any, run_id: str, extra_tags: dict[str, str]) -> None:
    """A resumed run: RUNNING again, its resumes counted, an earlier failure reason dropped, and
    where it runs now (e.g. a new Slurm job) and its config hash now (it may have been extended)
    tagged."""
    tags = client.get_run(run_id).data.tags
    for key, value in extra_tags.items():
        client.set_tag(run_id, key, value)
    client.set_tag(run_id, T.RESUMES, str(int(tags.get(T.RESUMES, 0)) + 1))
    if T.FAILURE_REASON in tags:
        client.delete_tag(run_id, T.FAILURE_REASON)
    client.update_run(run_id, status="RUNNING")


def log_expert_loads(logger: MLFlowLogger, loads: list[list[float]]) -> None:
    """Tokens per expert per MoE layer over the last validation, for the report's heatmaps."""
    logger.experiment.log_dict(logger.run_id, {"loads": loads}, "expert_load.json")


def close_abandoned(uri: str, run_id: str, reason: str) -> None:
    """A run whose process died before it could be resumed (no checkpoint, or one cut short): it
    would stay RUNNING forever beside the run that replaces it. Close it as KILLED, saying why."""

    client = MlflowClient(tracking_uri=uri)
    try:
        status = client.get_run(run_id).info.status
    except Exception:
        return  # another store, or deleted: nothing of ours to close
    if status in ("RUNNING", "SCHEDULED"):
        client.set_tag(run_id, T.KILLED_REASON, reason)
        client.set_terminated(run_id, "KILLED")


def mark_failed(logger: MLFlowLogger, reason: str) -> None:
    """End the run as FAILED with the reason as a tag (``failure_reason``)."""
    client = logger.experiment
    client.set_tag(logger.run_id, T.FAILURE_REASON, reason[:5000])
    client.set_terminated(logger.run_id, "FAILED")


def client(uri: str) -> MlflowClient:
    """The one way the platform opens the store (the tracking server's or a database file)."""
    return MlflowClient(tracking_uri=uri)


def record_failed_run(uri: str, experiment: str, run_name: str, tags: dict[str, str],
                      params: dict[str, Any] | None = None) -> str:  # fmt: skip
    """A FAILED run standing in for one that failed before its own existed (a setting the data
    refuses, a process killed at start), ``T.FAILURE_REASON`` among its tags: the comparison lists
    it instead of leaving its arm silently short."""
    exp_id = ensure_experiment(uri, experiment)
    c = client(uri)
    run = c.create_run(exp_id, run_name=run_name, tags=tags)
    for key, value in (params or {}).items():
        c.log_param(run.info.run_id, key, value)
    c.set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id
