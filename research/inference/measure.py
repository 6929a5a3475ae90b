"""What decoding costs, per run: tokens/s at given batch sizes and contexts, the cache as
allocated beside the bytes per token the model computes, the largest batch a memory budget holds,
and MTP speculation's acceptance and speed-up. The numbers behind the ``decode/*`` metrics."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from research.inference.engine import Decoder, generate
from research.inference.speculative import speculative_generate
from research.model.transformer import Transformer

GIB = 2**30


@dataclass(frozen=True)
class DecodeTiming:
    batch: int
    context: int  # positions already in the cache while the timed tokens are decoded
    tokens_per_s: float
    cache_gib: float  # the cache as allocated
    computed_cache_gib: float  # kv_cache_bytes_per_token x positions x batch, at the cache's dtype


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_decode(model: Transformer, batch: int, context: int, new_tokens: int = 32, compile: bool = False,
                warmup: int = 3) -> DecodeTiming:  # fmt: skip
    """Decode ``new_tokens`` per row with ``context`` positions already cached. The cache is not
    prefilled: a step's cost depends on how many positions it attends over, not on their values."""
    decoder = Decoder(model, batch, context + warmup + new_tokens, compile)
    decoder.lengths.fill_(context)
    tokens = torch.zeros(batch, dtype=torch.long, device=decoder.device)
    for _ in range(warmup):  # compiles and captures the graph when compiled
        decoder.step(tokens)
    _sync(decoder.device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        tokens = decoder.step(tokens).argmax(dim=-1)
    _sync(decoder.device)
    elapsed = time.perf_counter() - start
    positions = decoder.max_len * batch
    bytes_per_value = next(iter(decoder.cache[0].values())).element_size()
    computed = model.kv_cache_bytes_per_token(bytes_per_value) * positions
    return DecodeTiming(
        batch, context, batch * new_tokens / elapsed, decoder.cache_bytes() / GIB, computed / GIB
    )


def peak_bytes(model: Transformer, batch: int, context: int) -> float:
    """Bytes that a cache of ``batch`` x ``context`` and one decode step need: measured on a GPU
    (the peak allocated, weights included; infinite where it runs out of memory), counted on a
    CPU (weights and cache)."""
    device = model.embed.weight.device
    if device.type != "cuda":
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        return weights + batch * context * model.kv_cache_bytes_per_token(model.embed.weight.element_size())
    _release(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        decoder = Decoder(model, batch, context)
        decoder.lengths.fill_(context - 1)
        decoder.step(torch.zeros(batch, dtype=torch.long, device=device))
        _sync(device)
        return float(torch.cuda.max_memory_allocated(device))
    except torch.OutOfMemoryError:
        return float("inf")
    finally:
        decoder = None
        _release(device)


def _release(device: torch.device) -> None:
    """Free what a tried batch held: an out-of-memory error's traceback keeps its frames (and the
    cache they allocated) alive in reference cycles until the collector runs, and the next, smaller
    batch would then be measured on top of them."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()


def free_memory_gib(device: torch.device) -> float | None:
    """What a GPU has free now (None on a CPU, where there is no budget to search within)."""
    return torch.cuda.mem_get_info(device)[0] / GIB if device.type == "cuda" else None


def largest_batch(model: Transformer, context: int, budget_gib: float, limit: int = 1 << 16,
                  peak: Callable[[Transformer, int, int], float] = peak_bytes) -> int:  # fmt: skip
    """The largest batch whose decoding at ``context`` fits ``budget_gib`` (0: not even one row),
    to within 3%. Memory grows linearly with the batch (each row's cache and its share of the
    step), so batches 1 and 2 give the line and the batch it predicts is tried, then 3% fewer (an
    allocator rounds): four allocations where a bisection from 1 makes twenty or more, each of a
    cache that may fill most of the GPU. Where neither fits, the line was wrong: it bisects."""
    budget = budget_gib * GIB
    one = peak(model, 1, context)
    if one > budget:
        return 0
    two = peak(model, 2, context)
    if two > budget:
        return 1
    per_row = max(two - one, 1.0)
    predicted = min(limit, 1 + int((budget - one) // per_row))
    low, high = 2, predicted + 1  # low fits, high does not (or is past the limit)
    for batch in (predicted, int(predicted * 0.97)):
        if batch <= low:
            break
        if peak(model, batch, context) <= budget:
            return batch
        high = batch
    while high - low > 1:  # the line was wrong: bisect
        mid = (low + high) // 2
        low, high = (mid, high) if peak(model, mid, context) <= budget else (low, mid)
    return low


@dataclass(frozen=True)
class SpeculationTiming:
    acceptance: list[float]  # per MTP depth
    speedup: float  # speculative tokens/s over plain greedy tokens/s, same prompts
    same_tokens: bool  # speculative output equals plain greedy output


@torch.no_grad()
def time_speculation(model: Transformer, prompts: list[list[int]], new_tokens: int) -> SpeculationTiming:
    device = model.embed.weight.device
    generate(model, prompts, 2)  # warm-up
    _sync(device)
    start = time.perf_counter()
    plain = generate(model, prompts, new_tokens)
    _sync(device)
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    spec = speculative_generate(model, prompts, new_tokens)
    _sync(device)
    spec_s = time.perf_counter() - start
    return SpeculationTiming(spec.acceptance, plain_s / spec_s, spec.tokens == plain)


@dataclass(frozen=True)
class DecodeSettings:
    batches: tuple[int, ...] = (1, 8)
    contexts: tuple[int, ...] = (256,)
    new_tokens: int = 32
    # The budget for the largest batch; None: not measured. On a GPU the search allocates up to the
    # budget, so runs sharing the GPU (a grid's) leave it None.
    memory_gib: float | None = None
    compile: bool = False


def decode_metrics(
    model: Transformer, settings: DecodeSettings, prompts: list[list[int]] | None = None
) -> dict[str, float]:
    """Every ``decode/*`` metric of ``model`` (``research.metrics``); with ``prompts`` and MTP,
    speculation's acceptance and speed-up on them too."""
    from research import metrics as M

    out: dict[str, float] = {}
    for context in settings.contexts:
        for batch in settings.batches:
            t = time_decode(model, batch, context, settings.new_tokens, settings.compile)
            out[M.per_setting(M.DECODE_TOKENS_PER_S, batch, context)] = t.tokens_per_s
            out[M.per_setting(M.DECODE_KV_CACHE_GIB, batch, context)] = t.cache_gib
        budget = settings.memory_gib
        if budget is not None:
            out[M.per_setting(M.DECODE_MAX_BATCH, None, context)] = largest_batch(model, context, budget)
    first = (settings.batches[0], settings.contexts[0])
    out[M.DECODE_TOKENS_PER_S] = out[M.per_setting(M.DECODE_TOKENS_PER_S, *first)]
    out[M.DECODE_KV_CACHE_GIB] = out[M.per_setting(M.DECODE_KV_CACHE_GIB, *first)]
    if budget is not None:
        out[M.DECODE_MAX_BATCH] = out[M.per_setting(M.DECODE_MAX_BATCH, None, settings.contexts[-1])]
    if prompts and model.mtp_depth > 0:
        spec = time_speculation(model, prompts, settings.new_tokens)
        out[M.MTP_ACCEPTANCE] = spec.acceptance[0]
        out |= {f"{M.MTP_ACCEPTANCE}/d{k}": a for k, a in enumerate(spec.acceptance[1:], start=2)}
        out[M.SPECULATIVE_SPEEDUP] = spec.speedup
    return out
