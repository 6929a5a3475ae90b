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
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from research import metrics as M
from research.config.build import apply_precision_recipe, linear_factory, model_config, precision_of
from research.runtime import redact
from research.tracking import store as tracking
from research.tracking import tags as T
from research.training import checkpoints, converters, ownership, preemption
from research.training.callbacks import (
    DivergenceGuard,
    MoEMonitor,
    PerfMonitor,
    ProgressLines,
    StaticMetrics,
    StepCheckpoint,
    StepsProgressBar,
)
from research.training.checkpoints import RecordRunId, find_checkpoint
from research.training.data import LMDataModule
from research.training.module import LitLM
from research.training.preflight import check, deterministic
from research.training.strategies import cluster_plugins, make_strategy


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
        converters.options_of(cfg.trainer),
    )
    if line := apply_precision_recipe(module.model, cfg):
        print(line, flush=True)
    return data, module


def make_trainer(cfg: DictConfig, logger: Any, callbacks: list[L.Callback], run_dir: Path | None,
                 **changes: Any) -> L.Trainer:  # fmt: skip
    """The Lightning Trainer a config describes: strategy, devices, precision, schedule, clipping.
    ``changes`` replace any of its arguments (a benchmark's own logger, no checkpointing)."""
    t = cfg.trainer
    args = dict(
        accelerator=t.accelerator,
        strategy=make_strategy(t),
        devices=t.devices,
        num_nodes=t.num_nodes,
        plugins=cluster_plugins(),
        use_distributed_sampler=False,  # LMDataModule gives each rank its share itself
        deterministic=deterministic(t),
        precision=precision_of(cfg),
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
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    return L.Trainer(**{**args, **changes})


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
    check(cfg)  # the CLI's pre-check, for a grid job or a sweep trial that arrives without it
    config_hash = tracking.config_hash(cfg)
    latest = None if cfg.get("resume") else checkpoints.find_latest(run_dir, config_hash)
    resume = find_checkpoint(cfg.resume or str(latest)) if (cfg.get("resume") or latest) else None
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
            StaticMetrics(cfg.data.seq_len),
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
        trainer = make_trainer(cfg, logger, callbacks, run_dir, enable_progress_bar=bar)
        try:
            trainer.fit(module, datamodule=data, ckpt_path=resume.path if resume else None, weights_only=True)
            if trainer.global_step % t.val_every:  # finish on a measured model
                trainer.validate(module, datamodule=data, verbose=False)
                logger.finalize("success")
            if moe_monitor.global_loads is not None:
                tracking.log_expert_loads(logger, moe_monitor.global_loads.tolist())
            if cfg.eval.decode and rank_zero_only.rank == 0:
                log_decoding(cfg, data.prepare(), module, trainer, logger)
        except preemption.Requeued:
            raise  # the run is SCHEDULED, not failed: it continues when the job starts again
        except BaseException as e:
            tracking.mark_failed(logger, f"{type(e).__name__}: {' '.join(str(e).split())}")
            raise
        return TrainResult(logger.run_id, {k: float(v) for k, v in trainer.callback_metrics.items()})


def log_decoding(cfg: DictConfig, corpus: Any, module: LitLM, trainer: L.Trainer, logger: Any) -> None:
    """``eval.decode``: the ``decode/*`` metrics of the trained weights, on a plain copy of the
    model (no training converters), in the precision it trained in (bf16 for bf16-mixed)."""
    from research.training.trained import Trained, decode_settings, measure_decoding, rebuild

    if trainer.world_size > 1:  # the weights are spread over the ranks: measure the checkpoint instead
        print("eval.decode: measured for single-device runs; for this one: lab decode-bench RUN_FOLDER --log")
        return
    dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
    try:
        model = rebuild(cfg, corpus.vocab_size, module.model.state_dict())
        model = model.to(device=trainer.strategy.root_device, dtype=dtype).eval()
        trained = Trained(model, corpus.tokenizer, int(cfg.data.seq_len), cfg, None, corpus.tokens["val"])
        values = measure_decoding(trained, decode_settings(cfg))
    except Exception as e:  # a measurement after the fact: the trained run stays FINISHED
        reason = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        print(f"eval.decode: measured nothing: {reason}")
        logger.experiment.set_tag(logger.run_id, T.DECODE_ERROR, reason)
        return
    logger.log_metrics(values, step=trainer.global_step)


def run_dir_of_hydra_job() -> tuple[Path, list[str]]:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    return Path(hc.runtime.output_dir), list(hc.overrides.task)


def print_summary(cfg: DictConfig, run_dir: Path, result: Any) -> None:
    """What a finished run measured and where it is recorded (rank zero only)."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    m = result.metrics
    measured = [f"{M.VAL_BPB} {m[M.VAL_BPB]:.4f}" if M.VAL_BPB in m else None,
                f"{m[M.TOKENS_PER_S]:,.0f} tok/s" if M.TOKENS_PER_S in m else None]  # fmt: skip
    uri = redact(cfg.tracking.uri)
    print(f"finished: {', '.join(m for m in measured if m) or 'no metrics'}; MLflow run {result.run_id} "
          f"in experiment '{cfg.tracking.experiment}'")  # fmt: skip
    print(f"run folder: {run_dir}")
    if not uri.startswith("http"):
        print(f"look at it: mlflow ui --backend-store-uri {uri}")
    else:
        print(f"look at it: {uri}")
