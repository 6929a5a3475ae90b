"""Scaling over the GPUs of one host: the ``base`` MoE model (MLA + DeepSeekMoE, aux-free balance)
on 1 and on every visible GPU, with DDP and with DeepSpeed ZeRO-2, through the same module, data
and callbacks as ``lab train``. Each configuration runs in its own process (Lightning starts the
other ranks); the per-GPU batch is fixed, so the global batch grows with the GPU count.

    python -m bench.multi_gpu [--steps 40] [--per-gpu-batch 8] [--strategies ddp,deepspeed,fsdp]
                              [OVERRIDES ...]

Needs torch, Lightning, Hydra (and DeepSpeed for the ZeRO rows); prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from research import metrics as M

MODEL = ["attention=mla", "ffn=moe", "balance=aux_free"]
CONFIGS = {
    "ddp": ("DDP", []),
    "deepspeed": ("DeepSpeed ZeRO-2", ["trainer.zero_stage=2"]),
    "fsdp": ("FSDP full shard", []),
}


def worker(args: argparse.Namespace, extra: list[str]) -> None:
    from bench.train_step import run_arm

    metrics = run_arm([*MODEL, *extra], args.steps)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        Path(args.out).write_text(json.dumps(metrics))


def launch(strategy: str, devices: int, args: argparse.Namespace, extra: list[str]) -> dict | str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "metrics.json"
        overrides = [f"trainer={strategy}", f"trainer.devices={devices}",
                     f"data.batch_size={args.per_gpu_batch * devices}", *extra]  # fmt: skip
        cmd = [sys.executable, "-m", "bench.multi_gpu", "--worker", "--out", str(out),
               "--steps", str(args.steps), *overrides]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            tail = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()][-3:]
            return " | ".join(tail)[-300:]
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--per-gpu-batch", type=int, default=8)
    parser.add_argument("--strategies", default="ddp,deepspeed", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.worker:
        return worker(args, extra)
    n = torch.cuda.device_count()
    assert n >= 1, "this benchmark needs CUDA devices"
    print(f"torch {torch.__version__}, {n} x {torch.cuda.get_device_name()}; "
          f"model=base {' '.join(MODEL + extra)}; per-GPU batch {args.per_gpu_batch} x 2048 tokens, "
          f"{args.steps} steps")  # fmt: skip
    counts = sorted({1, n})
    print(f"{'strategy':<18}{'GPUs':>5}{'tokens/s':>12}{'per GPU':>11}{'scaling':>9}{'MFU':>7}"
          f"{'peak GiB/GPU':>14}{'train loss':>12}")  # fmt: skip
    for strategy in args.strategies.split(","):
        label, strategy_overrides = CONFIGS[strategy]
        base = None
        for devices in counts:
            m = launch(strategy, devices, args, [*strategy_overrides, *extra])
            if isinstance(m, str):
                print(f"{label:<18}{devices:>5}  failed: {m}")
                continue
            tps = m[M.TOKENS_PER_S]
            base = base or (tps if devices == 1 else None)
            scaling = f"{tps / base:.2f}x" if base else "-"
            print(f"{label:<18}{devices:>5}{tps:>12,.0f}{m[M.TOKENS_PER_S_PER_GPU]:>11,.0f}{scaling:>9}"
                  f"{m.get(M.MFU, float('nan')):>7.1%}{m[M.PEAK_MEM_GIB]:>14.2f}"
                  f"{m[M.TRAIN_LOSS]:>12.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
