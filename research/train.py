"""One code path from a composed config to a tracked, resumable training run.

``train(cfg)`` is what every entry point calls: the CLI, a grid job, a sweep trial. Everything that
can be checked is checked before the first step (model spec, data, checkpoint, tracking store), so
bad input costs seconds and leaves the records as they were.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from components.registry import require
from research import ownership, preemption, tracking
from research.callbacks import (
    DivergenceGuard,
    MoEMonitor,
    PerfMonitor,
    ProgressLines,
    StaticMetrics,
    StepCheckpoint,
    StepsProgressBar,
)
from research.config import apply_precision_recipe, linear_factory, model_config, precision_of
from research.data import LMDataModule
from research.module import LitLM
from research.ranges import check_ranges
from research.strategies import cluster_plugins, make_strategy


class CheckpointError(ValueError):
    """``resume`` names nothing loadable."""


@dataclass
class Resume:
    path: Path  # the checkpoint file
    run_id: str | None  # the MLflow run it belongs to
    config_hash: str | None = None  # of the config that wrote it


def find_checkpoint(resume: str) -> Resume:
    """``resume`` is a checkpoint (a file, or a DeepSpeed checkpoint folder) or a run folder (then
    its ``checkpoints/last.ckpt``)."""
    path = Path(resume).expanduser()
    if path.is_dir() and not (path / preemption.DEEPSPEED_STATES).exists():
        path = path / "checkpoints" / "last.ckpt"
    if not path.exists():
        raise CheckpointError(f"resume='{resume}': no checkpoint at {path}")
    try:
        ckpt = preemption.read_checkpoint(path)
    except Exception as e:  # read_checkpoint's own are one line; anything else is cut to its first
        reason = str(e) if isinstance(e, ValueError) else " ".join(str(e).split()).split(". ")[0]
        raise CheckpointError(f"resume='{resume}' is not a readable checkpoint: {reason}") from e
    return Resume(path, ckpt.get("mlflow_run_id"), ckpt.get("config_hash"))


# Keys a resume may change: they extend a run, not what its steps compute.
EXTENDS_A_RUN = ("trainer.max_steps",)


def run_folder_of(resume: str) -> Path:
    """The run folder ``resume`` names: itself, or the one holding ``checkpoints/FILE``."""
    path = Path(resume).expanduser()
    is_checkpoint = path.is_file() or (path / preemption.DEEPSPEED_STATES).exists()
    return path.parent.parent if is_checkpoint else path


def resumed_config(resume: str, overrides: list[str]) -> DictConfig:
    """``lab train resume=RUN [KEY=VALUE ...]``: the run's own config (``config.yaml`` in its
    folder), the overrides on top. An override that would change what the run computes (its
    config hash) is refused, except those that only extend it (``EXTENDS_A_RUN``); so is a
    checkpoint written by another config than the folder's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    ckpt = find_checkpoint(resume)
    folder = run_folder_of(resume)
    config_file = folder / "config.yaml"
    if not config_file.exists():
        raise CheckpointError(f"resume='{resume}': no config.yaml in {folder} (a run folder holds one)")
    cfg = OmegaConf.load(config_file)
    before = tracking.hashed_items(cfg)
    if ckpt.config_hash is not None and ckpt.config_hash != tracking.config_hash(cfg):
        raise CheckpointError(f"resume='{resume}': {ckpt.path.name} was written by another config than "
                              f"{config_file} (config_hash {ckpt.config_hash})")  # fmt: skip
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.get_key_element().lstrip("+")
        if key.startswith("hydra") or key == "resume":
            continue
        node = OmegaConf.select(cfg, key)
        if isinstance(node, DictConfig) and node.get("name") == o.value():
            continue  # a config group named as it already is (attention=mla on an MLA run)
        OmegaConf.update(cfg, key, o.value(), force_add=True)
    cfg.resume = str(ckpt.path)
    after = tracking.hashed_items(cfg)
    changed = sorted(
        k for k in before.keys() | after.keys() if before.get(k) != after.get(k) and k not in EXTENDS_A_RUN
    )
    if changed:
        key = changed[0]
        new = after.get(key, "(removed)")
        had = before.get(key, before.get(f"{key}.name"))  # a config group: the name it had
        raise CheckpointError(f"resume='{resume}': {key}={new!r} would change what the run computes "
                              f"(it has {had!r}); a resume may change only "
                              f"{', '.join(EXTENDS_A_RUN)}")  # fmt: skip
    _unmask_tracking(cfg, overrides, resume, config_file)
    return cfg


def _unmask_tracking(cfg: DictConfig, overrides: list[str], resume: str, config_file: Path) -> None:
    """``config.yaml`` holds URLs with their passwords masked: take each from the config as
    composed now (the defaults and the command line's tracking keys) where it is the same URL."""
    from research.grid import compose_run
    from research.redaction import redact

    recorded = tracking.flatten(OmegaConf.to_container(cfg.tracking))
    masked = [k for k, v in recorded.items() if ":***@" in str(v)]
    if not masked:
        return
    given = [o for o in overrides if o.lstrip("+").startswith("tracking.")]
    now = tracking.flatten(OmegaConf.to_container(compose_run(given).tracking, resolve=True))
    for key in masked:
        if redact(str(now.get(key))) != recorded[key]:
            raise CheckpointError(f"resume='{resume}': tracking.{key} has its password masked in "
                                  f"{config_file}; give it again: tracking.{key}=URL")  # fmt: skip
        OmegaConf.update(cfg, f"tracking.{key}", now[key])


class RecordRunId(L.Callback):
    """Puts the MLflow run id into every checkpoint, so a resume continues the same run, and the
    config hash, so an automatic resume only ever picks up a checkpoint of the same config."""

    def __init__(self, run_id: str, config_hash: str):
        self.run_id, self.config_hash = run_id, config_hash

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["mlflow_run_id"] = self.run_id
        checkpoint["config_hash"] = self.config_hash


def build(cfg: DictConfig) -> tuple[LMDataModule, LitLM]:
    """The seeded data and LightningModule a config describes, precision recipe applied."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = LMDataModule(cfg.data, seed=cfg.seed)
    corpus = data.prepare()
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    module = LitLM(
        model_config(cfg, corpus.vocab_size),
        optim,
        torch.from_numpy(corpus.token_bytes),
        linear_factory(cfg),
        speed_options(cfg.trainer),
    )
    apply_precision_recipe(module.model, cfg)
    return data, module


@dataclass
class TrainResult:
    run_id: str  # the MLflow run
    metrics: dict[str, float]  # the last value of each logged metric


def train(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str] | None = None,
    tags: dict[str, str] | None = None,
    callbacks: list[L.Callback] | None = None,
) -> TrainResult:
    """Train one configuration. ``tags`` go on the MLflow run (e.g. a parent run id), ``callbacks``
    join the standard ones (e.g. a pruner's). Raises before training on bad input.

    Without ``resume``, a checkpoint of this same config already in ``run_dir`` (a requeued Slurm
    job, a grid re-launched after a hard kill) is resumed into its MLflow run."""
    check_ranges(cfg)  # a grid job or sweep trial arrives here without the CLI's pre-check
    config_hash = tracking.config_hash(cfg)
    latest = None if cfg.get("resume") else preemption.find_latest(run_dir, config_hash)
    resume = find_checkpoint(cfg.resume or str(latest)) if (cfg.get("resume") or latest) else None
    precision = precision_of(cfg)
    tracking.ensure_experiment(cfg.tracking.uri, cfg.tracking.experiment)  # a dead store fails here
    with ownership.owned(run_dir, claim=rank_zero_only.rank == 0) as previous:  # other ranks: same folder
        if previous is not None and previous.run_id and (resume is None or resume.run_id != previous.run_id):
            reason = "killed before a checkpoint it could resume from; the folder's next attempt starts again"
            tracking.close_abandoned(cfg.tracking.uri, previous.run_id, reason)
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls on GPUs that have it
        data, module = build(cfg)
        logger = tracking.make_logger(cfg, run_dir, overrides or [], resume.run_id if resume else None, tags)
        if rank_zero_only.rank == 0:
            ownership.record_run(run_dir, logger.run_id)

        t = cfg.trainer
        ckpt_dir = resume.path.parent if resume else run_dir / "checkpoints"
        moe_monitor = MoEMonitor()
        callbacks = [
            *(callbacks or []),
            StepCheckpoint(t.checkpoint_every, dirpath=ckpt_dir, save_last=True, save_top_k=0),
            RecordRunId(logger.run_id, config_hash),
            PerfMonitor(t.perf_warmup_steps, cfg.data.seq_len),
            moe_monitor,
            StaticMetrics(),
            DivergenceGuard(math.gcd(t.log_every, t.checkpoint_every)),
            LearningRateMonitor(logging_interval="step"),
        ]
        bar = t.progress_bar and sys.stdout.isatty()
        if bar:
            # A refresh reads the loss: a GPU wait, so only every log_every steps.
            callbacks.append(StepsProgressBar(refresh_rate=t.log_every))
        else:  # a log file: plain lines
            callbacks.append(ProgressLines(t.log_every))
        if preemption.on_slurm():
            callbacks.append(preemption.RequeueOnSignal(ckpt_dir, t.requeue_signal))
        trainer = L.Trainer(
            accelerator=t.accelerator,
            strategy=make_strategy(t),
            devices=t.devices,
            num_nodes=t.num_nodes,
            plugins=cluster_plugins(),
            use_distributed_sampler=False,  # LMDataModule gives each rank its share itself
            deterministic=deterministic(t),
            precision=precision,
            max_steps=t.max_steps,
            val_check_interval=t.val_every,
            check_val_every_n_epoch=None,
            num_sanity_val_steps=0,
            # Validation under no_grad, not inference_mode: compiled blocks replayed as CUDA graphs
            # (trainer.cuda_graphs) have known failures with inference-mode tensors (pytorch#135892).
            inference_mode=False,
            log_every_n_steps=t.log_every,
            gradient_clip_val=t.grad_clip,
            accumulate_grad_batches=t.accumulate,
            logger=logger,
            callbacks=callbacks,
            enable_progress_bar=bar,
            enable_model_summary=False,
            default_root_dir=run_dir,
        )
        try:
            trainer.fit(module, datamodule=data, ckpt_path=resume.path if resume else None, weights_only=True)
            if trainer.global_step % t.val_every:  # finish on a measured model
                trainer.validate(module, datamodule=data, verbose=False)
                logger.finalize("success")
            if moe_monitor.global_loads is not None:
                tracking.log_expert_loads(logger, moe_monitor.global_loads.tolist())
        except preemption.Requeued:
            raise  # the run is SCHEDULED, not failed: it continues when the job starts again
        except BaseException as e:
            tracking.mark_failed(logger, f"{type(e).__name__}: {' '.join(str(e).split())}")
            raise
        return TrainResult(logger.run_id, {k: float(v) for k, v in trainer.callback_metrics.items()})


DETERMINISTIC = (False, True, "warn")


def deterministic(t: DictConfig) -> bool | str:
    """``trainer.deterministic``: atomics-based kernels (the embedding's gradient, flash
    attention's backward) make two runs of one config differ by more than a precision change does;
    ``true`` makes them repeat. ``warn`` only warns about such kernels: two bf16 runs under it still
    ended 0.87% apart in val/loss after 1000 steps on an H200."""
    value = t.get("deterministic", False)
    require(value in DETERMINISTIC, "trainer.deterministic", value, "false, true, warn")
    return value


def speed_options(t: DictConfig) -> dict:
    """``trainer.compile``, ``trainer.cuda_graphs``, ``trainer.fused_loss``,
    ``trainer.bf16_expert_weights`` and ``trainer.attention_kernel`` (research.speed). ``auto``
    leaves compiling off in a deterministic run: its kernels' determinism is not verified."""
    keys = ("compile", "cuda_graphs", "fused_loss", "bf16_expert_weights")
    options = {key: t.get(key, False) for key in keys}
    options["attention_kernel"] = t.get("attention_kernel", "auto")
    if options["compile"] == "auto" and deterministic(t) is True:
        options["compile"] = False
    return options


def run_dir_of_hydra_job() -> tuple[Path, list[str]]:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    return Path(hc.runtime.output_dir), list(hc.overrides.task)
