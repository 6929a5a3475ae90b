"""The training path on a GPU: the same config tree, data module, LightningModule and callbacks as
``lab train``, minus MLflow (a CSV logger instead), so it runs where only torch, Lightning and the
Hydra wheels are installed.

    python -m bench.train_step [--steps 40] [OVERRIDES ...]

Trains each arm for ``--steps`` steps in bf16 and prints one table: tokens/s, MFU and peak memory
(from the callbacks every run logs), the last training loss and val/bpb.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_module
from lightning.pytorch.loggers import CSVLogger

from research import metrics as M
from research.training.callbacks import DivergenceGuard, MoEMonitor, PerfMonitor
from research.training.run import build, make_trainer

ARMS = {
    "mha + dense": ["attention=mha", "ffn=dense", "balance=none"],
    "mla + moe (aux_free)": ["attention=mla", "ffn=moe", "balance=aux_free"],
}
BASE = ["model=base", "precision=bf16", "data.seq_len=2048", "data.batch_size=8", "data.val_tokens=65536"]


def run_arm(overrides: list[str], steps: int, callbacks: list[L.Callback] = ()) -> dict[str, float]:
    """Train ``steps`` steps of BASE + ``overrides`` (``trainer=ddp trainer.devices=2`` for several
    GPUs: Lightning starts the other ranks by running this command again); rank 0's metrics."""
    schedule = [f"trainer.max_steps={steps}", f"trainer.val_every={steps}", "trainer.log_every=5",
                "trainer.accelerator=gpu", "trainer.grad_clip=1.0"]  # fmt: skip
    with initialize_config_module("research.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*BASE, *overrides, *schedule])
    data, module = build(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        callbacks = [PerfMonitor(5, cfg.data.seq_len), MoEMonitor(), DivergenceGuard(), *callbacks]
        trainer = make_trainer(cfg, CSVLogger(tmp), callbacks, Path(tmp), enable_checkpointing=False)
        trainer.fit(module, datamodule=data)
    out = {k: float(v) for k, v in trainer.callback_metrics.items()}
    out["world_size"] = trainer.world_size
    out["params_M"] = module.model.num_params() / 1e6
    out["active_M"] = module.model.num_active_params() / 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    args, extra = parser.parse_known_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA device"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; {' '.join(BASE + extra)}")
    rows = []
    for name, overrides in ARMS.items():
        torch.cuda.empty_cache()
        rows.append((name, run_arm(overrides + extra, args.steps)))
    print(f"{'arm':<22}{'params M':>10}{'active M':>10}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}"
          f"{'train loss':>12}{'val/bpb':>9}")  # fmt: skip
    nan = float("nan")
    for name, m in rows:
        print(f"{name:<22}{m['params_M']:>10.1f}{m['active_M']:>10.1f}{m[M.TOKENS_PER_S]:>12,.0f}"
              f"{m.get(M.MFU, nan):>8.1%}{m.get(M.PEAK_MEM_GIB, nan):>10.2f}"
              f"{m.get(M.TRAIN_LOSS, nan):>12.4f}{m.get(M.VAL_BPB, nan):>9.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
