"""Lightning callbacks for what an ablation compares: speed, memory, expert balance, and a guard
that stops runs which diverged."""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import MLFlowLogger

from components.balance import max_violation
from components.fp8 import FP8Linear
from components.moe import MoE
from research import metrics as M
from research.errors import TrainingDiverged
from research.tracking import tags as T

log = logging.getLogger(__name__)

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


def on_log_step(trainer: L.Trainer) -> bool:
    """Whether this step's metrics reach the loggers. Reading a GPU value waits for the GPU and
    leaves it idle while the host queues the next step, so per-step readings happen only then."""
    return trainer.global_step % trainer.log_every_n_steps == 0


def log_evaluation(pl_module: L.LightningModule, values: dict[str, float]) -> None:
    """An evaluation's metrics at the number of steps trained. Lightning's own logging puts one run
    inside fit at that number minus one, and one after fit (``trainer.validate``) at the number:
    the curves of one run would not line up. ``self.log`` still feeds ``callback_metrics``."""
    pl_module.log_dict(values, logger=False, prog_bar=True, sync_dist=False)  # already all-reduced
    for logger in pl_module.trainer.loggers:
        logger.log_metrics(values, step=pl_module.trainer.global_step)


def send_step_metrics(trainer: L.Trainer) -> None:
    """Send this training step's metrics to the loggers now. Lightning sends them only after every
    ``on_train_batch_end`` hook, so a checkpoint written in one of them is ahead of its own step's
    metrics: killed in between, the run resumes after a step that was never recorded. Lightning's
    second send is dropped by ``research.tracking.store.OnceAStepLogger``. (A private call: Lightning has
    no public one.)"""
    trainer._logger_connector.update_train_step_metrics()


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` every ``every_n_train_steps`` steps, written after the step's metrics
    were sent (``send_step_metrics``)."""

    def __init__(self, every_n_train_steps: int, **kwargs: Any):
        super().__init__(every_n_train_steps=every_n_train_steps, **kwargs)
        self.every = every_n_train_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if trainer.global_step % self.every == 0:
            send_step_metrics(trainer)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class PerfMonitor(L.Callback):
    """``perf/step_ms`` (the mean over the steps since the last log), and ``perf/tokens_per_s``
    (the job's and per GPU) and ``perf/mfu`` averaged over every step after ``warmup_steps``
    (compilation and allocator warm-up excluded), plus peak memory per GPU (the largest rank's) and
    for the whole job. It waits for the GPU only on logging steps: between them steps queue up."""

    def __init__(self, warmup_steps: int, seq_len: int):
        self.warmup_steps, self.seq_len = warmup_steps, seq_len
        self._mark: float | None = None  # when the current window began (the GPU caught up)
        self._window_steps = self._window_tokens = 0
        self._tokens = 0
        self._seconds = 0.0

    def _now(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if self._mark is None or trainer.global_step <= self.warmup_steps:
            self._mark, self._window_steps, self._window_tokens = self._now(pl_module.device), 0, 0
            return
        self._window_steps += 1
        self._window_tokens += batch[:, 1:].numel() * trainer.world_size  # ranks step in lockstep
        if not on_log_step(trainer):
            return
        now = self._now(pl_module.device)
        window_s, self._mark = now - self._mark, now
        self._tokens += self._window_tokens
        self._seconds += window_s
        tokens_per_s = self._tokens / self._seconds
        values = {
            M.STEP_MS: 1000 * window_s / self._window_steps,
            M.TOKENS_PER_S: tokens_per_s,
            M.TOKENS_PER_S_PER_GPU: tokens_per_s / trainer.world_size,
        }
        self._window_steps = self._window_tokens = 0
        mem = torch.tensor([peak_memory_gib(pl_module.device)] * 2, device=pl_module.device)
        if trainer.world_size > 1:  # one small all-reduce per logging step
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
        self._mark = None  # evaluation time is not training time


class MoEMonitor(L.Callback):
    """MaxVio of the expert loads: per training batch (``moe/maxvio_batch``) and over the whole
    validation set (``moe/maxvio_global``), each the mean over MoE layers.

    It also watches for routing collapse: a layer that sends every token to the same K experts
    over the validation set (each of its K most used experts takes at least ``near_ceiling`` of the
    tokens, and so sits at MaxVio's ceiling E/K - 1) in ``patience`` evaluations in a row, or in
    the run's last one, gets a one-line warning naming it, and the run the tag
    ``moe.collapsed=true`` (``lab compare`` marks the arm). Evaluations, not training batches: early
    in training a layer can sit at the ceiling for a hundred steps and recover as the aux-free bias
    moves (seen on an H200 in runs that ended at MaxVio 0.3). All K experts, not only the most used
    one: without balancing, a layer often gives one expert every token and still routes its other
    K - 1 slots (MaxVio at the ceiling, val/bpb as good as balanced runs, seen on an H200); that
    layer still chooses, and is not called collapsed."""

    global_loads: torch.Tensor | None = None  # [layers, experts] over the last validation

    def __init__(self, patience: int = 2, near_ceiling: float = 0.95):
        self.patience, self.near_ceiling = patience, near_ceiling
        self._at_ceiling: dict[str, int] = {}  # layer -> evaluations in a row at the ceiling
        self.collapsed: list[str] = []  # the layers reported collapsed

    @staticmethod
    def _layers(pl_module: L.LightningModule) -> dict[str, MoE]:
        return {name: m for name, m in pl_module.model.named_modules() if isinstance(m, MoE)}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        layers = pl_module.model.moe_layers()
        if layers and on_log_step(trainer):  # MaxVio reads the loads on the host
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
        maxvio = [max_violation(load) for load in loads]
        log_evaluation(pl_module, {M.MAXVIO_GLOBAL: sum(maxvio) / len(maxvio)})
        last = trainer.global_step >= trainer.max_steps  # the run's final evaluation
        for (name, m), load, value in zip(self._layers(pl_module).items(), loads, maxvio, strict=True):
            E, K = m.router.n_experts, m.router.top_k
            tokens = load.sum() / K
            at_ceiling = E > K and tokens > 0 and load.topk(K).values[-1] >= self.near_ceiling * tokens
            self._at_ceiling[name] = self._at_ceiling.get(name, 0) + 1 if at_ceiling else 0
            seen = self._at_ceiling[name]
            if name not in self.collapsed and (seen >= self.patience or (last and seen)):
                self._report_collapse(trainer, name, value, E / K - 1, K, seen)

    def _report_collapse(self, trainer: L.Trainer, layer: str, maxvio: float, ceiling: float, k: int,
                         evaluations: int) -> None:  # fmt: skip
        if not self.collapsed:
            for logger in trainer.loggers:
                if isinstance(logger, MLFlowLogger) and logger.run_id:
                    logger.experiment.set_tag(logger.run_id, T.MOE_COLLAPSED, "true")
        self.collapsed.append(layer)
        log.warning(
            f"routing collapsed in MoE layer {layer} at step {trainer.global_step}: validation MaxVio "
            f"{maxvio:.2f} (ceiling E/K-1={ceiling:g}): every token went to the same {k} experts in "
            f"{evaluations} evaluation(s) in a row; the run is tagged {T.MOE_COLLAPSED}=true"
        )


class StaticMetrics(L.Callback):
    """Numbers fixed by the architecture, logged once; and which FP8 path the projections take
    (tag ``precision.fp8_path``: scaled_mm on FP8 hardware, emulated elsewhere)."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        paths = {m.resolve_path(pl_module.device) for m in pl_module.modules() if isinstance(m, FP8Linear)}
        for logger in trainer.loggers if paths else []:
            if isinstance(logger, MLFlowLogger) and logger.run_id:
                logger.experiment.set_tag(logger.run_id, "precision.fp8_path", ",".join(sorted(paths)))
        bytes_per_value = 2 if "16" in str(trainer.precision) else 4
        static = {M.KV_CACHE_BYTES_PER_TOKEN: pl_module.model.kv_cache_bytes_per_token(bytes_per_value),
                  **self._sizes}  # fmt: skip
        for logger in trainer.loggers:
            logger.log_metrics(static, step=0)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Counted on the whole model, before a sharding strategy splits its parameters.
        model = pl_module.model
        self._sizes = {M.FLOPS_PER_TOKEN: model.flops_per_token(self.seq_len),  # what a budget spends
                       M.PARAMS: model.num_params(), M.ACTIVE_PARAMS: model.num_active_params()}  # fmt: skip


class DivergenceGuard(L.Callback):
    """Stops a run whose loss turned NaN or infinite, with the first such step and value as the
    reason. The check reads the loss on the host every ``check_every`` steps (make it divide the
    checkpoint interval, so no diverged weights are saved); between checks the first bad step is
    kept on the device, which needs no waiting."""

    def __init__(self, check_every: int = 1):
        self.check_every = check_every
        self._first_bad: torch.Tensor | None = None  # [step, loss] of the first non-finite loss

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any
    ) -> None:
        loss = (outputs["loss"] if isinstance(outputs, dict) else outputs).detach().float()
        if self._first_bad is None:
            self._first_bad = torch.tensor([-1.0, 0.0], device=loss.device)
        # torch.full launches a fill; torch.tensor(step, device=...) would copy, and wait for the GPU
        here = torch.stack([torch.full((), float(trainer.global_step), device=loss.device), loss])
        first = ~torch.isfinite(loss) & (self._first_bad[0] < 0)
        self._first_bad = torch.where(first, here, self._first_bad)
        if trainer.global_step % self.check_every == 0:
            step, value = self._first_bad.tolist()
            if step >= 0:
                raise TrainingDiverged(f"loss is {value} at step {int(step)}")


class StepsProgressBar(RichProgressBar):
    """Rich's bar, described by what a run counts: steps (Lightning's "Epoch 0/-2" is an epoch of
    an endless stream out of a limit it does not have)."""

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'train':{len(self.validation_description)}}"


class ProgressLines(L.Callback):
    """Where no terminal shows a progress bar (a Slurm job's log, a grid run's ``log.txt``): one
    plain line every ``every`` steps (step, loss, tokens/s, ETA) and one per evaluation."""

    def __init__(self, every: int, stream: Any = None):
        self.every, self.stream = every, stream
        self._mark: tuple[float, int] | None = None  # (time, step) of the previous line

    def _print(self, trainer: L.Trainer, line: str) -> None:
        if trainer.is_global_zero:
            print(line, file=self.stream or sys.stdout, flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark = (time.perf_counter(), trainer.global_step)  # a resume starts later

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        step, total = trainer.global_step, trainer.max_steps
        if step % self.every and step != total:
            return
        loss = float(outputs["loss"])  # a GPU wait, once every `every` steps
        # The rate since the previous line (or evaluation): compilation is soon out of it.
        (then, then_step), now = self._mark, time.perf_counter()
        self._mark = (now, step)
        seconds_per_step = (now - then) / max(1, step - then_step)
        tokens_per_s = batch[:, 1:].numel() * trainer.world_size / seconds_per_step
        eta = seconds_per_step * (total - step)
        self._print(trainer, f"step {step}/{total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  "
                             f"ETA {_duration(eta)}")  # fmt: skip

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark = (time.perf_counter(), trainer.global_step)  # evaluation time is not training time
        bpb = trainer.callback_metrics.get(M.VAL_BPB)
        if bpb is not None:
            step = f"step {trainer.global_step}/{trainer.max_steps}"
            self._print(trainer, f"{step}  {M.VAL_BPB} {float(bpb):.4f}")


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
