"""Training throughput against the peers a researcher would otherwise pick: transformers'
DeepseekV3ForCausalLM (the MoE pair) and LlamaForCausalLM (the dense pair), each built from the
same config as ours, with the same number of weights, on one GPU; and torchtitan's DeepSeekV3 and
Llama 3 of that shape, compiled as torchtitan compiles them (``bench.torchtitan_peers``).

    python -m bench.throughput [--steps 20] [--pairs moe,dense] [--peers eager,compiled,torchtitan] [--layers]
    python -m bench.throughput --tiny --device cpu --steps 2   # a smoke run of the script itself

Every arm trains the same way: bf16 autocast, AdamW with fp32 weights (fused), batch 8 x 2048, a few
warm-up steps, then the median of the timed steps (a CUDA event between each two, no waiting).
Ours is the model training runs (``research.model.Transformer``), with its optimiser
(``research.training.optim.MasterAdamW``) and the speed options training applies on a GPU
(``research.training.converters``: ``trainer.compile``, ``trainer.cuda_graphs``, ``trainer.fused_loss``,
``trainer.bf16_expert_weights``, whose experts' weights are bf16 over fp32 masters, and
``trainer.attention_kernel`` by a kernel's name; ``--ours`` picks them,
several variants give each option's gain); its aux-free bias update is part of its step, as in
training. MFU counts one model's FLOPs for both sides of a pair (``Transformer.flops_per_token``).
Each variant's first training step computes the loss of the batch from the weights ours plain
(eager, no speed option) computes it from: the numerics check. Peak memory counts from before the
warm-up, so that it holds what recording CUDA graphs allocates; "reserved" is what the allocator
held, graph pools included.

Needs torch, Lightning and transformers (all in the device image), not MLflow or Hydra.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import torchtitan_peers
from bench.timing import time_ms
from components.ffn import FFN
from components.linear import make_linear
from research.model.hf_import import config_from_hf_deepseek_v3, from_hf_deepseek_v3
from research.model.transformer import ModelConfig, Transformer
from research.training import converters as speed
from research.training.adamw_step import StepScalars, adamw_master_update_reference
from research.training.callbacks import device_peak_flops
from research.training.optim import MasterAdamW


@dataclass
class Shape:
    """The issue's comparison shape; ``tiny`` shrinks it for a smoke run on a CPU."""

    vocab: int = 32000
    d_model: int = 1024
    n_layers: int = 8
    n_heads: int = 16
    ffn_hidden: int = 2816
    n_experts: int = 64
    top_k: int = 6
    expert_dim: int = 256
    batch: int = 8
    seq: int = 2048

    @classmethod
    def tiny(cls) -> Shape:
        return cls(vocab=512, d_model=128, n_layers=2, n_heads=4, ffn_hidden=256, n_experts=8, top_k=2,
                   expert_dim=64, batch=2, seq=128)  # fmt: skip


def moe_config(s: Shape) -> transformers.DeepseekV3Config:
    """DeepSeek-V3's shape at small scale: MLA, a dense first layer, then routed experts and one
    shared expert."""
    head = s.d_model // s.n_heads
    return transformers.DeepseekV3Config(
        vocab_size=s.vocab,
        hidden_size=s.d_model,
        intermediate_size=s.ffn_hidden,  # the dense first layer
        moe_intermediate_size=s.expert_dim,
        num_hidden_layers=s.n_layers,
        num_attention_heads=s.n_heads,
        num_key_value_heads=s.n_heads,
        q_lora_rank=s.d_model // 2,
        kv_lora_rank=s.d_model // 4,
        qk_nope_head_dim=head,
        qk_rope_head_dim=head // 2,
        v_head_dim=head,
        n_routed_experts=s.n_experts,
        num_experts_per_tok=s.top_k,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        max_position_embeddings=s.seq,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def dense_config(s: Shape) -> ModelConfig:
    """A Llama in our terms: MHA and a SwiGLU FFN, untied embeddings."""
    return ModelConfig(
        vocab_size=s.vocab,
        d_model=s.d_model,
        n_layers=s.n_layers,
        attention={"name": "mha", "n_heads": s.n_heads},
        ffn={"name": "dense", "hidden_dim": s.ffn_hidden},
    )


def moe_pair(s: Shape) -> tuple[Transformer, nn.Module]:
    """Ours is converted from the peer's weights, so both hold the same numbers."""
    peer = transformers.DeepseekV3ForCausalLM(moe_config(s))
    return from_hf_deepseek_v3(peer.config.to_dict(), peer.state_dict()), peer


def dense_pair(s: Shape) -> tuple[Transformer, nn.Module]:
    peer = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=s.vocab,
            hidden_size=s.d_model,
            intermediate_size=s.ffn_hidden,
            num_hidden_layers=s.n_layers,
            num_attention_heads=s.n_heads,
            num_key_value_heads=s.n_heads,
            max_position_embeddings=s.seq,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
    )
    return Transformer(dense_config(s)), peer


PAIRS = {"moe": ("ours mla+moe", "transformers DeepseekV3", moe_pair),
         "dense": ("ours mha+dense", "transformers Llama", dense_pair)}  # fmt: skip


@dataclass
class Timing:
    ms: float  # median step
    tokens_per_s: float
    peak_gib: float  # allocated
    reserved_gib: float
    first_loss: float  # of the first step, from the initial weights
    last_loss: float  # of the last timed step: where the same batch, trained on, has got to


def _ours_loss(model: Transformer, batch: torch.Tensor) -> torch.Tensor:
    return model(batch[:, :-1], batch[:, 1:]).loss


def _peer_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    inputs = batch[:, :-1]  # transformers shifts the labels itself: the same next-token task
    return model(input_ids=inputs, labels=inputs).loss


def time_training(model: nn.Module, loss_of: Callable, batch: torch.Tensor, steps: int, warmup: int,
                  after_step: Callable = lambda: None, profile: bool = False,
                  masters: dict | None = None) -> Timing:  # fmt: skip
    """``masters``: ours's optimiser, training's (``MasterAdamW``, with these fp32 masters of the
    weights stored in bf16); else the peers', ``torch.optim.AdamW``."""
    device = batch.device
    fused = device.type == "cuda"
    if masters is None:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    else:
        opt = MasterAdamW(model.parameters(), masters, lr=1e-4, fused=fused)

    def step() -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # for CUDA graphs: a new step (else a no-op)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_step()
        return loss

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    first_loss = float(step().detach())  # compiles and records, as do the rest of the warm-up steps
    for _ in range(warmup - 1):  # and autotunes, allocates the optimiser state
        step()
    # One event per step boundary and a single wait at the end: the steps queue up as in a training
    # loop that never waits on the GPU, so a host slower than its GPU shows, a forced idle does not.
    losses = []
    if device.type == "cuda":
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        marks[0].record()
        for mark in marks[1:]:
            losses.append(step().detach())
            mark.record()
        marks[-1].synchronize()
        times = [a.elapsed_time(b) for a, b in itertools.pairwise(marks)]
    else:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            losses.append(step().detach())
            times.append((time.perf_counter() - t0) * 1e3)
    ms = sorted(times)[len(times) // 2]
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan")
    if profile:
        _print_profile(step)
    return Timing(ms, batch[:, :-1].numel() / ms * 1e3, peak, reserved, first_loss, float(losses[-1]))


def _print_profile(step: Callable, steps: int = 3) -> None:
    """GPU time per kernel over a few steps: where a step's time goes."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=60))


def _fresh(model: nn.Module, device: torch.device) -> nn.Module:
    return copy.deepcopy(model).to(device).train()


KERNELS = tuple(k for k in speed.ATTENTION_KERNELS if k != "auto")
# the converters' options, as trainer.* applies them; a kernel name pins trainer.attention_kernel
OURS_OPTIONS = ("compile", "cuda_graphs", "fused_loss", "bf16_expert_weights", *KERNELS)
DEFAULT_OURS = "compile+cuda_graphs+fused_loss+bf16_expert_weights"  # what training applies on one GPU


def with_options(model: Transformer, options: str) -> tuple[Transformer, dict]:
    """``options``: "plain", or speed options joined by "+" (e.g. "compile+fused_loss+cudnn"),
    applied as training applies them on one GPU (``converters.convert``). Returns the model and the
    fp32 masters of its weights stored in bf16, for its optimiser."""
    chosen = set(options.split("+"))
    kernel = next(iter(chosen & set(KERNELS)), "auto")
    settings = {key: key in chosen for key in ("compile", "fused_loss", "bf16_expert_weights")}
    # as trainer.cuda_graphs=auto: on for compiled blocks on a GPU, off elsewhere (a CPU smoke run)
    settings |= {"cuda_graphs": "auto" if "cuda_graphs" in chosen else False, "attention_kernel": kernel}
    target = speed.Target(next(model.parameters()).device)
    return model, speed.convert(model, settings, target).masters


def plain_loss(ours: Transformer, batch: torch.Tensor) -> float:
    """The loss of one batch, ours eager without any speed option: what every variant must match."""
    with torch.no_grad(), torch.autocast(batch.device.type, dtype=torch.bfloat16):
        return float(_ours_loss(_fresh(ours, batch.device), batch))


def run_pair(name: str, s: Shape, device: torch.device, steps: int, warmup: int, ours_variants: list[str],
             peer_modes: list[str], profile: bool) -> None:  # fmt: skip
    ours_name, peer_name, build = PAIRS[name]
    torch.manual_seed(0)
    ours, peer = build(s)
    n_ours, n_peer = (sum(p.numel() for p in m.parameters()) for m in (ours, peer))
    assert n_ours == n_peer, f"{name}: {n_ours:,} weights in ours, {n_peer:,} in the peer"
    flops = ours.flops_per_token(s.seq)
    batch = torch.randint(0, s.vocab, (s.batch, s.seq + 1), device=device)
    print(f"\n{name}: {n_ours / 1e6:.1f}M weights both, {flops / 1e9:.2f} GFLOP per token (training)")
    plain = plain_loss(ours, batch)

    arms: list[tuple[str, str, Timing]] = []
    for i, options in enumerate(ours_variants):
        model, masters = with_options(_fresh(ours, device), options)
        profiled = profile and i == len(ours_variants) - 1  # the last: the fastest asked for
        timing = time_training(model, _ours_loss, batch, steps, warmup, model.update_balance_bias, profiled,
                               masters)  # fmt: skip
        print(f"loss of one batch, ours plain {plain:.5f} vs {options} {timing.first_loss:.5f} "
              f"(rel. difference {abs(timing.first_loss - plain) / plain:.1e})")  # fmt: skip
        arms.append((ours_name, options, timing))
        del model, masters
    for mode in peer_modes:
        if mode == "torchtitan":
            arms += _torchtitan_arm(name, s, device, n_ours, batch, steps, warmup)
            continue
        model = _fresh(peer, device)
        if mode == "compiled":
            model = torch.compile(model)
        arms.append((peer_name, mode, time_training(model, _peer_loss, batch, steps, warmup)))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    peak_flops = device_peak_flops(device) or float("nan")  # the table training's MFU uses
    ours_tps = arms[len(ours_variants) - 1][2].tokens_per_s  # the last of ours: the fastest asked for
    print(f"{'model':<26}{'options':<52}{'ms/step':>9}{'tokens/s':>11}{'MFU':>7}{'peak GiB':>10}"
          f"{'reserved':>10}{'loss':>9}{'last loss':>10}{'ours/this':>11}")  # fmt: skip
    for model_name, mode, t in arms:
        mfu = flops * t.tokens_per_s / peak_flops
        print(f"{model_name:<26}{mode:<52}{t.ms:>9.1f}{t.tokens_per_s:>11,.0f}{mfu:>7.1%}{t.peak_gib:>10.2f}"
              f"{t.reserved_gib:>10.2f}{t.first_loss:>9.4f}{t.last_loss:>10.4f}"
              f"{ours_tps / t.tokens_per_s:>10.2f}x")  # fmt: skip


def _torchtitan_arm(pair: str, s: Shape, device: torch.device, n_ours: int, batch: torch.Tensor, steps: int,
                   warmup: int) -> list[tuple[str, str, Timing]]:  # fmt: skip
    """torchtitan's model of the pair, compiled as its trainer compiles it (bench.torchtitan_peers)."""
    if reason := torchtitan_peers.missing(pair, device):
        print(reason)
        return []
    torch.manual_seed(0)
    model = torchtitan_peers.build(pair, s, device).to(device).train()
    n = sum(p.numel() for p in model.parameters())
    assert n == n_ours, f"{pair}: {n_ours:,} weights in ours, {n:,} in torchtitan's"
    # Its apply_compile sets capture_scalar_outputs for the whole process: only for its own arm here.
    try:
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            torchtitan_peers.compile_as_torchtitan(pair, model)
            timing = time_training(model, torchtitan_peers.loss, batch, steps, warmup)
    except Exception as e:  # a peer that fails on this torch must not take the pair's table with it
        print(f"torchtitan's {pair} peer failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        return []
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return [
        (f"torchtitan {'DeepSeekV3' if pair == 'moe' else 'Llama 3'}", "compiled (its apply_compile)", timing)
    ]


def check_master_adamw(device: torch.device) -> None:
    """``MasterAdamW``'s update on this device (its Triton kernel on a GPU) against its torch
    reference in float64, over a few steps of a clipped gradient: the bf16 weights' numerics."""
    update = adamw_master_update_reference
    if device.type == "cuda":
        from research.training.adamw_triton import adamw_master_update as update
    g = torch.Generator(device).manual_seed(0)
    n = 3 * 2**20 + 5
    master = torch.randn(n, generator=g, device=device)
    grads = [torch.randn(n, generator=g, device=device).bfloat16() for _ in range(3)]
    results = []
    for run_update, dtype in ((update, torch.float32), (adamw_master_update_reference, torch.float64)):
        p, w = master.bfloat16(), master.to(dtype, copy=True)  # updated in place
        m, v = torch.zeros_like(w), torch.zeros_like(w)
        scale = torch.tensor(0.7, device=device, dtype=dtype)  # a clipping coefficient
        group = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.01}
        for step, grad in enumerate(grads, 1):
            run_update(p, w, grad, m, v, scale, StepScalars.of(group, step))
        results.append((p, w))
    (p, w), (_, w64) = results
    error = float(((w.double() - w64).abs() / w64.abs().clamp_min(1e-3)).max())
    rounded = bool(torch.equal(p, w.bfloat16()))
    print(f"MasterAdamW's update vs its float64 reference: max rel. error {error:.1e}; "
          f"bf16 weights = fp32 masters rounded: {rounded}")  # fmt: skip


def _time_layer(layer: nn.Module, x: torch.Tensor, call: Callable, iters: int = 10) -> float:
    """Median ms of one fwd+bwd of ``layer`` under bf16 autocast (after 3 warm-up calls)."""

    def run() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = call(layer, x)
        out.float().square().mean().backward()

    if x.device.type != "cuda":
        run()
        return float("nan")
    return time_ms(run, iters)


def layers(s: Shape, device: torch.device) -> None:
    """Per-layer fwd+bwd, eager and compiled, of the modules the models are built from: MHA vs MLA
    attention, and the MoE layer vs a dense FFN of equal active FLOPs (hidden = (top_k + 1 shared)
    x expert_dim)."""
    moe = Transformer(config_from_hf_deepseek_v3(moe_config(s).to_dict()))
    dense = Transformer(dense_config(s))
    equal_active = {"name": "dense", "hidden_dim": (s.top_k + 1) * s.expert_dim}
    x = torch.randn(s.batch, s.seq, s.d_model, device=device, requires_grad=True)
    positions = torch.arange(s.seq, device=device)
    attention = lambda layer, x: layer(x, positions)  # noqa: E731
    ffn = lambda layer, x: layer(x)  # noqa: E731
    mla_flash = copy.deepcopy(moe.blocks[1].attn)
    mla_flash.sdpa_kernel = SDPBackend.FLASH_ATTENTION  # which takes MLA's v only zero-padded
    candidates = {
        "attention MHA": (dense.blocks[0].attn, attention),
        "attention MLA": (moe.blocks[1].attn, attention),
        "attention MLA, flash": (mla_flash, attention),
        "MoE layer": (moe.blocks[1].ffn, ffn),
        "dense FFN, equal active": (FFN.build(equal_active, d_model=s.d_model, linear=make_linear), ffn),
    }
    print(f"\nlayers, fwd+bwd of [{s.batch}, {s.seq}, {s.d_model}] (median ms)")
    print(f"{'layer':<26}{'eager':>9}{'compiled':>10}")
    for name, (layer, call) in candidates.items():
        layer = layer.to(device)
        eager = _time_layer(layer, x, call)
        layer.compile()
        compiled = _time_layer(layer, x, call)
        print(f"{name:<26}{eager:>9.3f}{compiled:>10.3f}")
    if device.type == "cuda":
        sdpa_kernels(s, device)


def _time_sdpa(s: Shape, dqk: int, dv: int, kernel, device: torch.device) -> float | None:
    """Median ms of causal SDPA fwd+bwd on ``kernel`` (None: SDPA's own pick); None if it refuses."""

    def tensor(dim: int) -> torch.Tensor:
        shape = (s.batch, s.n_heads, s.seq, dim)
        return torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True)

    q, k, v = tensor(dqk), tensor(dqk), tensor(dv)

    def run() -> None:
        with sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext():
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        y.backward(torch.ones_like(y))

    try:
        return time_ms(run)
    except RuntimeError:
        return None


def sdpa_kernels(s: Shape, device: torch.device) -> None:
    """Causal SDPA alone, fwd+bwd in bf16, on each kernel: which one the attention shapes get by
    default (auto), and what the others would give (n/a: the kernel refuses the shape)."""
    D = s.d_model // s.n_heads
    shapes = {"MHA": (D, D), "MLA": (D + D // 2, D), "MLA, v padded": (D + D // 2, D + D // 2)}
    kernels = {name: k for name, k in speed.ATTENTION_KERNELS.items() if name != "math"}  # auto: SDPA's pick
    print(f"\nSDPA fwd+bwd, causal, [{s.batch}, {s.n_heads}, {s.seq}, dim] bf16 (median ms)")
    print(f"{'shape':<16}{'q/k, v dims':>12}" + "".join(f"{name:>11}" for name in kernels))
    for name, (dqk, dv) in shapes.items():
        times = [_time_sdpa(s, dqk, dv, kernel, device) for kernel in kernels.values()]
        cells = "".join(f"{'n/a':>11}" if t is None else f"{t:>11.3f}" for t in times)
        print(f"{name:<16}{f'{dqk}, {dv}':>12}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20, help="timed steps per arm (the median counts)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--pairs", default="moe,dense", help=f"comma-separated: {', '.join(PAIRS)}")
    parser.add_argument("--peers", default="eager,compiled,torchtitan",
                        help="eager, compiled (transformers'), torchtitan (its own), or none")  # fmt: skip
    parser.add_argument("--ours", default=DEFAULT_OURS,
                        help="comma-separated variants of ours: plain, or options joined by + "
                        f"({', '.join(OURS_OPTIONS)}); the last is compared with the peers")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="GPU time per kernel, last of ours")
    parser.add_argument("--layers", action="store_true", help="also the per-layer microbenchmarks")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape: a smoke run of this script")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    pairs, peers = args.pairs.split(","), [] if args.peers == "none" else args.peers.split(",")
    for what, given, allowed in (
        ("--pairs", pairs, PAIRS),
        ("--peers", peers, ("eager", "compiled", "torchtitan")),
    ):
        if unknown := set(given) - set(allowed):
            parser.error(f"unknown {what} {sorted(unknown)}; choose from {', '.join(allowed)}")
    device = torch.device(args.device)
    s = Shape.tiny() if args.tiny else Shape()
    torch.set_float32_matmul_precision("high")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {name}; "
          f"batch {s.batch} x seq {s.seq}, {args.steps} timed steps after {args.warmup}")  # fmt: skip
    ours = args.ours.split(",")
    for variant in ours:
        if unknown := set(variant.split("+")) - {"plain", *OURS_OPTIONS}:
            parser.error(
                f"unknown --ours option {sorted(unknown)}; choose from plain, {', '.join(OURS_OPTIONS)}"
            )
    check_master_adamw(device)
    for pair in pairs:
        run_pair(pair, s, device, args.steps, args.warmup, ours, peers, args.profile)
    if args.layers:
        layers(s, device)
    # Speed counts only on a path that learns: the gate's last verdict here, beside the table.
    from bench.quality import latest_verdict  # MLflow's: only where the gate's verdict is read

    print(latest_verdict())


if __name__ == "__main__":
    main()
