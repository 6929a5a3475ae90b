"""A short timed run of a config, for budgets in GPU seconds: the same model, data, speed options and
trainer a real run gets, minus MLflow and checkpoints."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, open_dict

from research import metrics as M
from research.training.callbacks import PerfMonitor
from research.training.run import build, make_trainer


def tokens_per_s(cfg: DictConfig, steps: int) -> float:
    """Tokens/s of ``cfg`` over at least ``steps`` steps after its ``trainer.perf_warmup_steps``
    (compiling and the allocator's warm-up left out, as in every run's ``perf/tokens_per_s``)."""
    cfg = cfg.copy()
    warmup = int(cfg.trainer.perf_warmup_steps)
    with open_dict(cfg):
        # PerfMonitor reads the clock on logging steps only: end on one, `steps` past the warm-up.
        cfg.trainer.log_every = steps
        cfg.trainer.max_steps = steps * (1 + math.ceil(warmup / steps))
    data, module = build(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(cfg, CSVLogger(tmp), [PerfMonitor(warmup, cfg.data.seq_len)], Path(tmp),
                               enable_checkpointing=False, limit_val_batches=0)  # fmt: skip
        trainer.fit(module, datamodule=data)
    return float(trainer.callback_metrics[M.TOKENS_PER_S])
