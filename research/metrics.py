"""Metric names: the one contract shared by the trainer, the comparison report and the sweeps."""

TRAIN_LOSS = "train/loss"
TRAIN_LM_LOSS = "train/lm_loss"
TRAIN_MTP_LOSS = "train/mtp_loss"
TRAIN_BALANCE_LOSS = "train/balance_loss"
VAL_LOSS = "val/loss"
VAL_BPB = "val/bpb"
TOKENS_PER_S = "perf/tokens_per_s"
MFU = "perf/mfu"
STEP_MS = "perf/step_ms"
PEAK_MEM_GIB = "perf/peak_mem_gib"
MAXVIO_BATCH = "moe/maxvio_batch"
MAXVIO_GLOBAL = "moe/maxvio_global"
KV_CACHE_BYTES_PER_TOKEN = "attn/kv_cache_bytes_per_token"

ALL = (
    TRAIN_LOSS, TRAIN_LM_LOSS, TRAIN_MTP_LOSS, TRAIN_BALANCE_LOSS, VAL_LOSS, VAL_BPB, TOKENS_PER_S, MFU,
    STEP_MS, PEAK_MEM_GIB, MAXVIO_BATCH, MAXVIO_GLOBAL, KV_CACHE_BYTES_PER_TOKEN,
)  # fmt: skip
