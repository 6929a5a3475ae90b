"""Run the ``lab`` CLI in a subprocess, as a user would, and read back what MLflow recorded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

# A run in seconds: tiny model, short windows, 4 steps, evaluated twice.
TINY = [
    "model=tiny", "precision=fp32", "data.seq_len=32", "data.batch_size=2", "data.val_tokens=256",
    "trainer.max_steps=4", "trainer.val_every=2", "trainer.log_every=1", "trainer.checkpoint_every=2",
    "trainer.perf_warmup_steps=1", "trainer.progress_bar=false",
]  # fmt: skip


def run_lab(cwd: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``lab ARGS`` in ``cwd``, offline, with its own (or the session's shared) token cache."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf")}
    env.setdefault("LAB_CACHE_DIR", str(cwd / "cache"))
    return subprocess.run([sys.executable, "-m", "research.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def lab(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``lab train ARGS``."""
    return run_lab(cwd, "train", *args, timeout=timeout)


def runs(cwd: Path, experiment: str = "adhoc") -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlruns.db'}")
    exp = client.get_experiment_by_name(experiment)
    return (
        [] if exp is None else client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    )


def history(cwd: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlruns.db'}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single 'error: ...' line a bad input must produce (and no traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]
