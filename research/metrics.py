"""Metric names: the one contract shared by the trainer, the comparison report and the sweeps.

``REPORTED`` says what ``lab compare`` shows and how: a metric added there is a column of the report,
with its label, its direction and its format.
"""

from __future__ import annotations

from dataclasses import dataclass

TRAIN_LOSS = "train/loss"
TRAIN_LM_LOSS = "train/lm_loss"
TRAIN_MTP_LOSS = "train/mtp_loss"
TRAIN_BALANCE_LOSS = "train/balance_loss"
VAL_LOSS = "val/loss"
VAL_BPB = "val/bpb"
TOKENS_PER_S = "perf/tokens_per_s"  # the whole job: every GPU together
TOKENS_PER_S_PER_GPU = "perf/tokens_per_s_per_gpu"
MFU = "perf/mfu"
STEP_MS = "perf/step_ms"
PEAK_MEM_GIB = "perf/peak_mem_gib"  # per GPU (or process): the largest over the ranks
PEAK_MEM_GIB_JOB = "perf/peak_mem_gib_job"  # the sum over the ranks
MAXVIO_BATCH = "moe/maxvio_batch"
MAXVIO_GLOBAL = "moe/maxvio_global"
KV_CACHE_BYTES_PER_TOKEN = "attn/kv_cache_bytes_per_token"
FLOPS_PER_TOKEN = "model/train_flops_per_token"  # forward + backward, MTP and active experts only
PARAMS = "model/params"
ACTIVE_PARAMS = "model/active_params"  # those one token touches

ALL = (
    TRAIN_LOSS, TRAIN_LM_LOSS, TRAIN_MTP_LOSS, TRAIN_BALANCE_LOSS, VAL_LOSS, VAL_BPB, TOKENS_PER_S,
    TOKENS_PER_S_PER_GPU, MFU, STEP_MS, PEAK_MEM_GIB, PEAK_MEM_GIB_JOB, MAXVIO_BATCH, MAXVIO_GLOBAL,
    KV_CACHE_BYTES_PER_TOKEN, FLOPS_PER_TOKEN, PARAMS, ACTIVE_PARAMS,
)  # fmt: skip


@dataclass(frozen=True)
class MetricSpec:
    name: str
    label: str  # the column header
    lower_is_better: bool
    integer: bool = False  # shown as 1,234 rather than 0.1234
    summary: str = "last"  # one run's number from its history: see ``summarise_history``

    def format(self, value: float) -> str:
        if value != value:  # NaN
            return "n/a"
        if self.integer:
            return f"{value:,.0f}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"


REPORTED = (
    MetricSpec(VAL_BPB, "val/bpb", lower_is_better=True),
    MetricSpec(TOKENS_PER_S, "tokens/s", lower_is_better=False, integer=True),
    MetricSpec(MFU, "MFU", lower_is_better=False),
    MetricSpec(PEAK_MEM_GIB, "peak GiB", lower_is_better=True),
    MetricSpec(MAXVIO_GLOBAL, "MaxVio", lower_is_better=True),
    MetricSpec(KV_CACHE_BYTES_PER_TOKEN, "KV B/token", lower_is_better=True, integer=True),
)


def spec_of(name: str) -> MetricSpec:
    """The report's spec of ``name``; a metric it does not list is shown as a plain number."""
    return next((s for s in REPORTED if s.name == name), MetricSpec(name, name, lower_is_better=True))


SUMMARIES = "last, min, max, or mean_last_K (the mean of the last K evaluations, e.g. mean_last_3)"


def summarise_history(values: list[float], how: str) -> float:
    """One run's number for a metric from its values in step order: the ``last``, the ``min`` or
    ``max``, or ``mean_last_K``, which smooths the noise of one evaluation."""
    last_k = _last_k(how)
    if how == "last":
        return values[-1]
    if how in ("min", "max"):
        return min(values) if how == "min" else max(values)
    if last_k is None:
        raise ValueError(f"summary {how!r} is not allowed; allowed: {SUMMARIES}")
    tail = values[-last_k:]
    return sum(tail) / len(tail)


def check_summary(how: str) -> None:
    if how not in ("last", "min", "max") and _last_k(how) is None:
        raise ValueError(f"summary {how!r} is not allowed; allowed: {SUMMARIES}")


def _last_k(how: str) -> int | None:
    k = how.removeprefix("mean_last_")
    return int(k) if how.startswith("mean_last_") and k.isdigit() and int(k) > 0 else None
