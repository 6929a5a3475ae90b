"""Surviving Slurm time limits and preemption: checkpoint, requeue, resume into the same run.

Slurm sends ``--signal=USR1@N`` N seconds before it ends a job. The handler only raises a flag;
at the next step boundary every rank agrees (one all-reduce), all save the same checkpoint
(``checkpoints/preempt.ckpt``), rank 0 marks the MLflow run SCHEDULED and calls
``scontrol requeue``, and training stops with ``Requeued``. When the job starts again, ``train()``
finds the newest checkpoint in the run folder (``find_latest``) and continues the same MLflow run
from it. Periodic checkpoints (``checkpoints/last.ckpt``) cover a hard kill the same way.

Owning the requeue here rather than in Lightning or submitit: Lightning's handler checkpoints from
inside the signal (mid-step, and it can deadlock against an all-reduce on other ranks), and
submitit's checkpointing sees only the submitted function, not the trainer's state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

from research import signals
from research.launch import slurm
from research.tracking import tags as T
from research.training.callbacks import send_step_metrics


class Requeued(BaseException):
    """Training stopped after a checkpoint because Slurm requeued the job. A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` (Optuna's ``catch``) carries on regardless."""


def on_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


class RequeueOnSignal(L.Callback):
    """Checkpoint and requeue when Slurm warns (see the module docstring)."""

    def __init__(self, checkpoint_dir: Path, signal_name: str):
        self.path = Path(checkpoint_dir) / "preempt.ckpt"
        signals.install(signal_name)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        requested = signals.requested()  # one process reads its own flag: no GPU tensor, no wait
        if trainer.world_size > 1:  # ranks get the signal at slightly different steps: agree on one
            flag = torch.tensor([float(requested)], device=pl_module.device)
            requested = bool(trainer.strategy.reduce(flag, reduce_op="max").item())
        if not requested:
            return
        send_step_metrics(trainer)  # the resumed run starts at the next step
        trainer.save_checkpoint(self.path)  # every rank: sharded strategies write their shards
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                client, run_id = getattr(logger, "experiment", None), getattr(logger, "run_id", None)
                if run_id:
                    client.set_tag(run_id, T.REQUEUED_AT_STEP, str(trainer.global_step))
                    client.update_run(run_id, status="SCHEDULED")
                    logger.requeued = True  # no later "failed" from Lightning's interrupt handling
            slurm.requeue()
        raise Requeued(f"checkpointed at step {trainer.global_step} and requeued")
