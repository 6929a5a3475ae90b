"""Lightning callbacks for what an ablation compares: speed, memory, expert balance, and a guard
that stops runs which diverged."""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger

from components.balance import max_violation
from components.fp8 import FP8Linear
from research import metrics as M
from research.errors import TrainingDiverged

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, most specific first.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A6000": 155e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where unknown (CPU, unlisted GPUs): then no MFU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak, so runs sharing a process (a local grid) each report their own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak RSS (VmHWM)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA allocator peak on GPU; the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # KiB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class PerfMonitor(L.Callback):
    """``perf/step_ms`` per step, and ``perf/tokens_per_s`` (the job's and per GPU) and ``perf/mfu``
    averaged over every step after ``warmup_steps`` (compilation and allocator warm-up excluded), plus
    peak memory per GPU (the largest rank's) and for the whole job."""

    def __init__(self, warmup_steps: int, seq_len: int):
        self.warmup_steps, self.seq_len = warmup_steps, seq_len
        self._last: float | None = None
        self._tokens = 0
        self._seconds = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        last, self._last = self._last, now
        if last is None or trainer.global_step <= self.warmup_steps:
            return
        step_s = now - last
        self._tokens += batch[:, 1:].numel() * trainer.world_size  # ranks step in lockstep
        self._seconds += step_s
        tokens_per_s = self._tokens / self._seconds
        values = {
            M.STEP_MS: 1000 * step_s,
            M.TOKENS_PER_S: tokens_per_s,
            M.TOKENS_PER_S_PER_GPU: tokens_per_s / trainer.world_size,
        }
        mem = torch.tensor([peak_memory_gib(pl_module.device)] * 2, device=pl_module.device)
        if trainer.world_size > 1:  # one small all-reduce per step; the step already synchronised
            mem = torch.cat([trainer.strategy.reduce(mem[:1], reduce_op="max"),
                             trainer.strategy.reduce(mem[1:], reduce_op="sum")])  # fmt: skip
        values[M.PEAK_MEM_GIB], values[M.PEAK_MEM_GIB_JOB] = mem.tolist()
        peak = device_peak_flops(pl_module.device)
        if peak:
            values[M.MFU] = self._flops_per_token * tokens_per_s / (peak * trainer.world_size)
        pl_module.log_dict(values)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Counted on the whole model, before a sharding strategy splits its parameters.
        self._flops_per_token = pl_module.model.flops_per_token(self.seq_len)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reset_peak_memory(pl_module.device)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None  # evaluation time is not training time


class MoEMonitor(L.Callback):
    """MaxVio of the expert loads: per training batch (``moe/maxvio_batch``) and over the whole
    validation set (``moe/maxvio_global``), each the mean over MoE layers."""

    global_loads: torch.Tensor | None = None  # [layers, experts] over the last validation

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        layers = pl_module.model.moe_layers()
        if layers:
            pl_module.log(M.MAXVIO_BATCH, sum(max_violation(m.last_load) for m in layers) / len(layers))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._loads = [torch.zeros_like(m.last_load) for m in pl_module.model.moe_layers()]

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        for acc, m in zip(self._loads, pl_module.model.moe_layers(), strict=True):
            acc += m.last_load

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._loads:
            return
        loads = [trainer.strategy.reduce(load, reduce_op="sum") for load in self._loads]
        self.global_loads = torch.stack(loads).cpu()  # [layers, experts], for load heatmaps
        pl_module.log(M.MAXVIO_GLOBAL, sum(max_violation(load) for load in loads) / len(loads))


class StaticMetrics(L.Callback):
    """Numbers fixed by the architecture, logged once; and which FP8 path the projections take
    (tag ``precision.fp8_path``: scaled_mm on FP8 hardware, emulated elsewhere)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        paths = {m.resolve_path(pl_module.device) for m in pl_module.modules() if isinstance(m, FP8Linear)}
        for logger in trainer.loggers if paths else []:
            if isinstance(logger, MLFlowLogger) and logger.run_id:
                logger.experiment.set_tag(logger.run_id, "precision.fp8_path", ",".join(sorted(paths)))
        bytes_per_value = 2 if "16" in str(trainer.precision) else 4
        for logger in trainer.loggers:
            logger.log_metrics(
                {M.KV_CACHE_BYTES_PER_TOKEN: pl_module.model.kv_cache_bytes_per_token(bytes_per_value)},
                step=0,
            )


class DivergenceGuard(L.Callback):
    """Stops a run the moment its loss is NaN or infinite, with the step and value as the reason."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(f"loss is {value} at step {trainer.global_step}")
