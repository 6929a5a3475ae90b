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
# Decoding (``eval.decode=true`` or ``lab decode-bench``); each also per setting, e.g.
# ``decode/tokens_per_s/b8_ctx1024`` (``per_setting``), the headline being the first setting's.
DECODE_TOKENS_PER_S = "decode/tokens_per_s"
DECODE_KV_CACHE_GIB = "decode/kv_cache_gib"  # the cache as allocated
DECODE_MAX_BATCH = "decode/max_batch"  # the largest batch within the memory budget
MTP_ACCEPTANCE = "mtp/acceptance_rate"  # depth 1's drafts kept; mtp/acceptance_rate/d2 ... deeper
SPECULATIVE_SPEEDUP = "decode/speculative_speedup"  # greedy tokens/s, speculative over plain

ALL = (
    TRAIN_LOSS, TRAIN_LM_LOSS, TRAIN_MTP_LOSS, TRAIN_BALANCE_LOSS, VAL_LOSS, VAL_BPB, TOKENS_PER_S,
    TOKENS_PER_S_PER_GPU, MFU, STEP_MS, PEAK_MEM_GIB, PEAK_MEM_GIB_JOB, MAXVIO_BATCH, MAXVIO_GLOBAL,
    KV_CACHE_BYTES_PER_TOKEN, FLOPS_PER_TOKEN, PARAMS, ACTIVE_PARAMS, DECODE_TOKENS_PER_S,
    DECODE_KV_CACHE_GIB, DECODE_MAX_BATCH, MTP_ACCEPTANCE, SPECULATIVE_SPEEDUP,
)  # fmt: skip


def per_setting(metric: str, batch: int | None, context: int) -> str:
    """``decode/tokens_per_s/b8_ctx1024``: a decoding metric at one batch size and context."""
    return f"{metric}/{'' if batch is None else f'b{batch}_'}ctx{context}"


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
    MetricSpec(DECODE_TOKENS_PER_S, "decode tok/s", lower_is_better=False, integer=True),
    MetricSpec(DECODE_MAX_BATCH, "max batch", lower_is_better=False, integer=True),
    MetricSpec(MTP_ACCEPTANCE, "MTP accept", lower_is_better=False),
    MetricSpec(SPECULATIVE_SPEEDUP, "spec. speedup", lower_is_better=False),
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
