"""Decoding against transformers' ``generate`` path (a static cache, the same shapes), for MHA, GQA
and MLA: tokens/s at each context and batch, the cache as allocated beside what the model says it
caches, and the largest batch a memory budget holds at each context.

    python -m bench.decode [--contexts 1024,8192,32768] [--batches 1,8] [--budget-gib 40]
    python -m bench.decode --tiny --device cpu   # a smoke run of the script itself

Each attention x side runs in its own process (``--no-isolate``: all in this one), so a crash or a
compile past ``--side-timeout`` costs that piece's rows, not the table.

One decode step is timed with its context already in the cache (neither side prefills: a step's
cost depends on how many positions it attends over). Ours is ``research.inference.engine.Decoder``,
eager and compiled (one step replayed as a CUDA graph); the peer is ``LlamaForCausalLM`` (MHA, GQA)
or ``DeepseekV3ForCausalLM`` (MLA with its MoE; ours is converted from its weights) stepping a
``transformers.StaticCache``, eager and with its forward compiled as transformers' docs show. The
peer caches MLA's latent and rope key as ours does (transformers 5's DeepseekV3 does: the cache
column shows both sides' bytes). bf16 on a GPU.

Needs torch and transformers, and OmegaConf and Lightning for what it imports from ``research``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

from bench.throughput import Shape, moe_config
from research.inference.measure import GIB, largest_batch, time_decode
from research.model.hf_import import from_hf_deepseek_v3
from research.model.transformer import ModelConfig, Transformer


def llama(s: Shape, n_kv_heads: int) -> tuple[Transformer, torch.nn.Module]:
    attention = {"name": "gqa", "n_heads": s.n_heads, "n_kv_heads": n_kv_heads}
    ours = Transformer(ModelConfig(vocab_size=s.vocab, d_model=s.d_model, n_layers=s.n_layers,
                                   attention=attention,
                                   ffn={"name": "dense", "hidden_dim": s.ffn_hidden}))  # fmt: skip
    peer = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.d_model, intermediate_size=s.ffn_hidden,
        num_hidden_layers=s.n_layers,
        num_attention_heads=s.n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=1 << 17,
        tie_word_embeddings=False, attn_implementation="sdpa"))  # fmt: skip
    return ours, peer


def deepseek(s: Shape) -> tuple[Transformer, torch.nn.Module]:
    config = moe_config(s)
    config.max_position_embeddings = 1 << 17
    peer = transformers.DeepseekV3ForCausalLM(config)
    return from_hf_deepseek_v3(peer.config.to_dict(), peer.state_dict()), peer


VARIANTS: dict[str, Callable[[Shape], tuple[Transformer, torch.nn.Module]]] = {
    "mha": lambda s: llama(s, s.n_heads),
    "gqa": lambda s: llama(s, s.n_heads // 4),
    "mla": deepseek,
}


@dataclass
class Row:
    variant: str
    side: str
    batch: int
    context: int
    tokens_per_s: float
    cache_gib: float
    computed_gib: float | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_bytes(cache: transformers.StaticCache) -> int:
    layers = getattr(cache, "layers", None)
    tensors = [t for layer in layers for t in (layer.keys, layer.values)] if layers else [
        *cache.key_cache, *cache.value_cache]  # fmt: skip
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@torch.no_grad()
def time_peer(peer: torch.nn.Module, batch: int, context: int, new_tokens: int, compiled: bool,
              warmup: int = 3) -> tuple[float, float]:  # fmt: skip
    """(tokens/s, cache GiB) of the peer stepping a static cache already ``context`` long."""
    device = next(peer.parameters()).device
    cache = transformers.StaticCache(config=peer.config, max_cache_len=context + warmup + new_tokens)
    forward = (
        torch.compile(peer.forward, mode="reduce-overhead", fullgraph=True) if compiled else peer.forward
    )
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
    position = context

    def step(tokens: torch.Tensor) -> torch.Tensor:
        nonlocal position
        at = torch.tensor([position], device=device)
        logits = forward(input_ids=tokens, past_key_values=cache, cache_position=at, use_cache=True).logits
        position += 1
        return logits[:, -1:].argmax(dim=-1)

    for _ in range(warmup):
        tokens = step(tokens)
    _sync(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        tokens = step(tokens)
    _sync(device)
    return batch * new_tokens / (time.perf_counter() - start), _cache_bytes(cache) / GIB


def run_variant(name: str, s: Shape, device: torch.device, dtype: torch.dtype, contexts: list[int],
                batches: list[int], new_tokens: int, sides: list[str],
                quiet: bool = False) -> list[Row]:  # fmt: skip
    ours, peer = VARIANTS[name](s)
    ours, peer = ours.to(device=device, dtype=dtype).eval(), peer.to(device=device, dtype=dtype).eval()
    rows = []
    for context in contexts:
        for batch in batches:
            for side in sides:
                try:
                    if side.startswith("ours"):
                        t = time_decode(ours, batch, context, new_tokens, compile=side == "ours compiled")
                        rows.append(
                            Row(name, side, batch, context, t.tokens_per_s, t.cache_gib, t.computed_cache_gib)
                        )
                    else:
                        tps, gib = time_peer(
                            peer, batch, context, new_tokens, compiled=side == "peer compiled"
                        )
                        rows.append(Row(name, side, batch, context, tps, gib))
                except Exception as e:  # one side's failure is a row of the table, not the end of it
                    why = " ".join(str(e).split())[:160]
                    print(f"{name} {side} b{batch} ctx{context}: {type(e).__name__}: {why}")
                    rows.append(Row(name, side, batch, context, float("nan"), float("nan")))
                if not quiet:
                    print_row(rows[-1])
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def isolated(variant: str, side: str, args: argparse.Namespace, contexts: list[int],
             batches: list[int]) -> list[Row]:  # fmt: skip
    """One attention x side in a child process: compiled decoding (ours, and transformers' with
    its static cache) has crashed the whole process on a GPU, and a compile can run long; either
    is then that piece's rows, as NaN, not the end of the table."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "bench.decode", "--variants", variant, "--sides", side, "--contexts",
               args.contexts, "--batches", args.batches, "--new-tokens", str(args.new_tokens), "--device",
               args.device, "--rows-to", str(out), *(["--tiny"] if args.tiny else [])]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.side_timeout)
            why = f"exit code {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
        except subprocess.TimeoutExpired:
            proc, why = None, f"not done within {args.side_timeout:g} s"
        if proc is not None and proc.returncode == 0:
            rows = [Row(**r) for r in json.loads(out.read_text())]
        else:
            print(f"{variant} {side}: {why}")
            rows = [Row(variant, side, b, c, float("nan"), float("nan")) for c in contexts for b in batches]
    for r in rows:
        print_row(r)
    return rows


HEADER = (
    "| attention | side | batch | context | tokens/s | cache GiB | computed GiB | cache / computed |\n"
    "|---|---|---|---|---|---|---|---|"
)


def print_row(r: Row) -> None:
    ratio = "-" if r.computed_gib is None else f"{r.cache_gib / r.computed_gib:.3f}"
    computed = "-" if r.computed_gib is None else f"{r.computed_gib:.4g}"
    print(f"| {r.variant} | {r.side} | {r.batch} | {r.context} | {r.tokens_per_s:,.0f} | {r.cache_gib:.4g} | "
          f"{computed} | {ratio} |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="mha,gqa,mla")
    parser.add_argument("--contexts", default="1024,8192,32768")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sides", default="ours eager,ours compiled,peer eager,peer compiled")
    parser.add_argument("--budget-gib", type=float, default=40.0, help="memory for the largest-batch search")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape: a smoke run of this script")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="each attention x side in its own process (a crash or hang is its rows' failure)",
    )
    parser.add_argument("--side-timeout", type=float, default=300, help="seconds for one isolated piece")
    parser.add_argument("--rows-to", help=argparse.SUPPRESS)  # an isolated piece writes its rows here
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    s = Shape.tiny() if args.tiny else Shape()
    contexts, batches = [int(c) for c in args.contexts.split(",")], [int(b) for b in args.batches.split(",")]
    variants, sides = args.variants.split(","), args.sides.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown --variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {name}, {dtype}; "
          f"d_model {s.d_model}, {s.n_layers} layers, {s.n_heads} heads; "
          f"{args.new_tokens} timed tokens after 3")  # fmt: skip
    if args.rows_to:  # one piece of an isolated run: its rows, for the parent to print
        rows = [r for v in variants for r in run_variant(v, s, device, dtype, contexts, batches,
                                                           args.new_tokens, sides, quiet=True)]  # fmt: skip
        Path(args.rows_to).write_text(json.dumps([asdict(r) for r in rows]))
        return
    print(HEADER)
    if args.isolate:
        rows = [r for v in variants for side in sides for r in isolated(v, side, args, contexts, batches)]
    else:
        rows = [r for v in variants for r in run_variant(v, s, device, dtype, contexts, batches,
                                                         args.new_tokens, sides)]  # fmt: skip

    print(f"\nLargest batch within {args.budget_gib:g} GiB (ours; weights, cache and one step):")
    print("| attention | " + " | ".join(f"ctx {c}" for c in contexts) + " |")
    print("|---|" + "---|" * len(contexts))
    fits: dict[tuple[str, int], int] = {}
    for v in variants:
        model = VARIANTS[v](s)[0].to(device=device, dtype=dtype).eval()
        if device.type == "cuda":  # what the search starts from (the weights, and nothing left over)
            print(f"  {v}: {torch.cuda.memory_allocated(device) / GIB:.2f} GiB allocated before the search")
        for c in contexts:
            fits[v, c] = largest_batch(model, c, args.budget_gib)
        print(f"| {v} | " + " | ".join(str(fits[v, c]) for c in contexts) + " |")
        del model

    print("\nTargets:")
    by = {(r.variant, r.side, r.batch, r.context): r for r in rows}
    for v in variants:
        for c in contexts:
            best_ours = max((by[v, o, 1, c].tokens_per_s for o in ("ours eager", "ours compiled")
                             if (v, o, 1, c) in by), default=float("nan"))  # fmt: skip
            peer = max((by[v, p, 1, c].tokens_per_s for p in ("peer eager", "peer compiled")
                        if (v, p, 1, c) in by), default=float("nan"))  # fmt: skip
            print(f"- {v} ctx {c}, batch 1: ours {best_ours:,.0f} tok/s vs peer {peer:,.0f}: "
                  f"{'met' if best_ours >= peer else 'NOT met'}")  # fmt: skip
    mla = [r for r in rows if r.variant == "mla" and r.computed_gib]
    if mla:
        worst = max(abs(r.cache_gib / r.computed_gib - 1) for r in mla)
        print(
            f"- MLA's measured cache within 10% of computed: worst {worst:.1%}: "
            f"{'met' if worst <= 0.1 else 'NOT met'}"
        )
    longest = contexts[-1]
    if ("mla", longest) in fits and ("mha", longest) in fits:
        ratio = fits["mla", longest] / max(fits["mha", longest], 1)
        print(f"- at ctx {longest}, MLA fits {fits['mla', longest]} rows vs MHA {fits['mha', longest]}: "
              f"{ratio:.1f}x: {'met' if ratio >= 3 else 'NOT met'}")  # fmt: skip


if __name__ == "__main__":
    main()
