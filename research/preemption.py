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
import pickle
import re
import signal
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch

from components.registry import require
from research import slurm_entry
from research.callbacks import send_step_metrics

_requested = False


class Requeued(BaseException):
    """Training stopped after a checkpoint because Slurm requeued the job. A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` (Optuna's ``catch``) carries on regardless."""


def _on_signal(signum: int, frame: Any) -> None:
    global _requested
    _requested = True


def install(name: str) -> None:
    """Catch ``SIG<name>`` from now on (call early: its default action kills the process)."""
    signum = getattr(signal, f"SIG{name}", None)
    require(isinstance(signum, signal.Signals), "trainer.requeue_signal", name, "USR1, USR2, TERM, ...")
    signal.signal(signum, _on_signal)
    if slurm_entry.held():  # it came while the task was still starting
        _on_signal(signum, None)


def requested() -> bool:
    return _requested


def on_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


class RequeueOnSignal(L.Callback):
    """Checkpoint and requeue when Slurm warns (see the module docstring)."""

    def __init__(self, checkpoint_dir: Path, signal_name: str):
        self.path = Path(checkpoint_dir) / "preempt.ckpt"
        install(signal_name)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        requested = _requested  # one process reads its own flag: no GPU tensor, no wait
        if trainer.world_size > 1:  # ranks get the signal at slightly different steps: agree on one
            flag = torch.tensor([float(_requested)], device=pl_module.device)
            requested = bool(trainer.strategy.reduce(flag, reduce_op="max").item())
        if not requested:
            return
        send_step_metrics(trainer)  # the resumed run starts at the next step
        trainer.save_checkpoint(self.path)  # every rank: sharded strategies write their shards
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                client, run_id = getattr(logger, "experiment", None), getattr(logger, "run_id", None)
                if run_id:
                    client.set_tag(run_id, "requeued_at_step", str(trainer.global_step))
                    client.update_run(run_id, status="SCHEDULED")
                    logger.requeued = True  # no later "failed" from Lightning's interrupt handling
            job = os.environ["SLURM_JOB_ID"]
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"scontrol requeue {job} failed: {done.stderr.strip()}")
        raise Requeued(f"checkpointed at step {trainer.global_step} and requeued")


DEEPSPEED_STATES = Path("checkpoint") / "mp_rank_00_model_states.pt"  # where DeepSpeed keeps the rest


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents without its tensors' data (memory-mapped): a Lightning file, or a
    DeepSpeed checkpoint folder (its model-states file carries Lightning's other keys).

    ``weights_only``: tensors and plain containers only, never code. Unpickling anything else
    can run what the file says (a planted checkpoint, or one a tag points at); ours hold no
    objects, and ``train()`` has Lightning load them the same way."""
    path = Path(path)
    target = path / DEEPSPEED_STATES if path.is_dir() else path
    if not zipfile.is_zipfile(target):  # torch.save's format; torch's own error names mmap options
        raise ValueError("not a checkpoint (corrupt or truncated)")
    try:
        ckpt = torch.load(target, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch's wording for the callable it refused
        what = f" ({refused[1]})" if refused else ""
        raise ValueError(f"it holds objects that could run code{what}: refused, not run") from None
    except RuntimeError as e:  # torch's reader: the cause is its first sentence
        raise ValueError(f"not a checkpoint (corrupt or truncated): {str(e).split('. ')[0]}") from None
    if not isinstance(ckpt, dict) or not ({"state_dict", "global_step"} & set(ckpt)):
        raise ValueError("not a Lightning checkpoint (no state_dict or global_step)")
    return ckpt


def find_latest(run_dir: Path, config_hash: str) -> Path | None:
    """The newest checkpoint in ``run_dir/checkpoints`` written by a run of this very config."""
    found = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in found:
        try:
            if read_checkpoint(path).get("config_hash") == config_hash:
                return path
        except Exception:
            continue  # a file cut short by the kill: try the one before
    return None
