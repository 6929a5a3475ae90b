"""Requeue on Slurm's warning signal, without Slurm: the step the signal lands on keeps its logged
metrics, since the resumed run starts at the step after it."""

import subprocess

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from research import metrics as M
from research import preemption
from research.module import LitLM
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
            preemption._on_signal(0, None)


@pytest.mark.parametrize("signal_step", [5, 7])  # a logging step, and one between them
def test_requeue_keeps_the_metrics_of_the_step_it_lands_on(tmp_path, monkeypatch, signal_step):
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setattr(preemption, "_requested", False)
    done = subprocess.CompletedProcess([], 0, "", "")
    monkeypatch.setattr(preemption.subprocess, "run", lambda *a, **k: done)
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
