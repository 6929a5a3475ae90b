"""Requeue on Slurm's warning signal, without Slurm, and periodic checkpoints: the step a
checkpoint is written at keeps its logged metrics, once, since the resumed run starts after it."""

import subprocess

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from mlflow import MlflowClient

from research import metrics as M
from research import signals
from research.launch import slurm
from research.tracking.store import OnceAStepLogger
from research.training import preemption
from research.training.callbacks import StepCheckpoint
from research.training.module import LitLM
from tests.conftest import tiny_config

OPTIM = {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0, "warmup_steps": 1,
         "total_steps": 20, "min_lr_ratio": 0.1}  # fmt: skip


class Recorded(Logger):
    name, version = "recorded", 0

    def __init__(self):
        super().__init__()
        self.steps: list[int] = []

    def log_metrics(self, metrics, step=None):
        if M.TRAIN_LOSS in metrics:
            self.steps.append(step)

    def log_hyperparams(self, *args, **kwargs):
        pass


class SignalAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            signals._raise_flag(0, None)


@pytest.mark.parametrize("signal_step", [5, 7])  # a logging step, and one between them
def test_requeue_keeps_the_metrics_of_the_step_it_lands_on(tmp_path, monkeypatch, signal_step):
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setattr(signals, "_requested", False)
    done = subprocess.CompletedProcess([], 0, "", "")
    monkeypatch.setattr(slurm.subprocess, "run", lambda *a, **k: done)
    logger = Recorded()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=20, log_every_n_steps=5, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[SignalAt(signal_step), preemption.RequeueOnSignal(tmp_path, "USR2")],
    )  # fmt: skip
    data = torch.utils.data.DataLoader(torch.randint(0, 64, (40, 9)), batch_size=2)
    with pytest.raises(preemption.Requeued):
        trainer.fit(LitLM(tiny_config(), OPTIM, torch.ones(64)), data)
    assert logger.steps == [4]  # step 5 (logged as 4), and none after the requeue
    assert (tmp_path / "preempt.ckpt").exists()


def test_a_step_checkpoint_comes_after_its_step_is_recorded_once(tmp_path):
    # Killed right after a checkpoint, a run resumes at the step after it: that step's metrics must
    # already be in MLflow, and Lightning's own later send of them must not record them twice.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    logger = OnceAStepLogger(experiment_name="ckpt", tracking_uri=client.tracking_uri)
    recorded_at_save = {}

    class Watched(StepCheckpoint):
        def _save_checkpoint(self, trainer, filepath):
            history = client.get_metric_history(logger.run_id, M.TRAIN_LOSS)
            recorded_at_save[trainer.global_step] = sorted(m.step for m in history)
            super()._save_checkpoint(trainer, filepath)

    trainer = L.Trainer(
        accelerator="cpu", max_steps=10, log_every_n_steps=5, logger=logger, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[Watched(5, dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)],
    )  # fmt: skip
    data = torch.utils.data.DataLoader(torch.randint(0, 64, (40, 9)), batch_size=2)
    trainer.fit(LitLM(tiny_config(), OPTIM, torch.ones(64)), data)
    assert recorded_at_save[5] == [4]  # step 5's checkpoint: the step logged as 4 already recorded
    assert [m.step for m in client.get_metric_history(logger.run_id, M.TRAIN_LOSS)] == [4, 9]  # once each


def test_a_requeued_run_waits_as_scheduled_not_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setattr(signals, "_requested", False)
    done = subprocess.CompletedProcess([], 0, "", "")
    monkeypatch.setattr(slurm.subprocess, "run", lambda *a, **k: done)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    logger = OnceAStepLogger(experiment_name="requeue", tracking_uri=client.tracking_uri)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=20, log_every_n_steps=5, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[SignalAt(3), preemption.RequeueOnSignal(tmp_path, "USR2")],
    )  # fmt: skip
    data = torch.utils.data.DataLoader(torch.randint(0, 64, (40, 9)), batch_size=2)
    with pytest.raises(preemption.Requeued):
        trainer.fit(LitLM(tiny_config(), OPTIM, torch.ones(64)), data)
    assert client.get_run(logger.run_id).info.status == "SCHEDULED"  # what the README promises
