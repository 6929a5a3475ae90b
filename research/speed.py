"""Speed options of a training run that leave its numerics alone: ``trainer.compile``,
``trainer.cuda_graphs``, ``trainer.fused_loss`` and ``trainer.bf16_expert_weights``, each
``auto``, ``true`` or ``false``; ``trainer.attention_kernel``, the SDPA kernel of causal attention
(``auto``: SDPA's own pick)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend

from components.attention import ATTENTION_TYPES
from components.ffn import SwiGLU
from components.loss import chunk_for, cross_entropy_chunk
from components.moe import GroupedExperts
from components.registry import require, spec_error
from research.model import Transformer

CHOICES = "auto, true, false"
ATTENTION_KERNELS = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                     "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip


def enabled(key: str, setting: Any, device: torch.device, sharded: bool = False) -> bool:
    """``auto`` turns an option on on a GPU, where fused kernels and fewer launches pay, and off on
    a CPU, where compiling costs more than a test's few steps; and off under FSDP or DeepSpeed,
    whose parameter wrappers it has not been measured with (``true`` still asks for it)."""
    if setting == "auto":
        return device.type == "cuda" and not sharded
    require(isinstance(setting, bool), f"trainer.{key}", setting, CHOICES)
    return setting


def cuda_graphs_enabled(setting: Any, device: torch.device, compiled: bool, distributed: bool) -> bool:
    """``trainer.cuda_graphs``: ``auto`` is on for compiled blocks on one GPU; off with several
    processes, whose gradient hooks it has not been measured with, and on ROCm, where torch's
    graph trees are reported to slow training's convergence (pytorch#187715). The graphs are the
    compiled blocks', so ``true`` needs ``trainer.compile`` on and a CUDA GPU."""
    if setting is True:
        require(compiled, "trainer.cuda_graphs", True, "false or auto while trainer.compile is off")
        require(
            device.type == "cuda",
            "trainer.cuda_graphs",
            True,
            f"false or auto on {device.type} (needs a CUDA GPU)",
        )
    unmeasured = distributed or torch.version.hip is not None  # where auto leaves them off
    return enabled("cuda_graphs", setting, device, sharded=unmeasured) and compiled


def bf16_expert_weights_enabled(setting: Any, device: torch.device, model: Transformer, precision: str,
                                single_process: bool, accumulate: int) -> bool:  # fmt: skip
    """``trainer.bf16_expert_weights`` (``store_experts_in_bf16``): ``auto`` is on on a GPU where
    it changes nothing but speed: bf16 autocast, one process (several would reduce the gradients in
    bf16), no gradient accumulation (it would add them up in bf16), experts not under the FP8 recipe
    (which rounds the weights itself). ``true`` asks for it, on a CPU too, under those same terms."""
    unmet = [why for ok, why in (
        (precision == "bf16-mixed", "unless precision is bf16"),
        (single_process, "with several processes"),
        (accumulate == 1, "with trainer.accumulate above 1"),
        (not _fp8_experts(model), "with the experts under precision=fp8"),
    ) if not ok]  # fmt: skip
    if setting == "auto":
        experts = any(isinstance(m, GroupedExperts) for m in model.modules())
        return device.type == "cuda" and experts and not unmet
    require(isinstance(setting, bool), "trainer.bf16_expert_weights", setting, CHOICES)
    if setting and unmet:
        raise spec_error("trainer.bf16_expert_weights", True, f"false or auto {unmet[0]}")
    return setting


def _fp8_experts(model: Transformer) -> bool:
    return any(isinstance(m, GroupedExperts) and m.fp8 is not None for m in model.modules())


def store_experts_in_bf16(model: Transformer) -> dict[nn.Parameter, torch.Tensor]:
    """Store the routed experts' weights in bf16, the dtype their grouped GEMMs read under bf16
    autocast (``research.optim``: what this saves). Returns each weight's fp32 tensor: its master
    for ``research.optim.MasterAdamW``, which the weight must be trained with."""
    masters = {}
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            for p in module.parameters():
                masters[p] = p.data
                p.data = p.data.to(torch.bfloat16)
    return masters


def compile_blocks(
    model: Transformer, cuda_graphs: bool = False, stacked: bool = True, **options: Any
) -> None:
    """``torch.compile`` every block in place (the MTP modules' too), and the fused loss's per-chunk
    softmax and gradient. Compiling block by block keeps compile time flat in depth (blocks of one
    shape share their compiled code) and leaves parameter names and checkpoints as they are.
    ``stacked``: with the projections of one input stacked (``stack_projections``), which pays only
    compiled; false under a sharding strategy, which splits the weights it stacks.
    ``cuda_graphs``: each block's forward and backward replay as CUDA graphs (torch.compile's
    ``reduce-overhead`` mode): one launch each, where a MoE step launches ~1300 kernels, and a
    host CPU slower than its GPU at launching them leaves the GPU waiting (H200, MoE at the bench
    shape: 53.9 -> 44.4 ms a step on one machine). Each step must then begin with
    ``torch.compiler.cudagraph_mark_step_begin()``. ``options`` go to ``torch.compile``."""
    # A clean slate: code compiled for earlier models of this process (an Optuna worker trains its
    # trials one after another) fills torch.compile's per-function recompile limit, after which
    # every block would run eager, with only a warning, from the fourth architecture on.
    torch._dynamo.reset()
    if stacked:
        stack_projections(model)
    block_options = {**options, "mode": "reduce-overhead"} if cuda_graphs else options
    for block in [*model.blocks, *(m.block for m in model.mtp)]:
        block.compile(**block_options)
    model.loss_chunk_fn = torch.compile(cross_entropy_chunk, **options)


def stack_projections(model: Transformer) -> None:
    """Projections that read the same input run as one GEMM (``components.linear.project``): MHA's
    q, k, v; MLA's query and latent down-projections; SwiGLU's gate and up (dense FFNs and shared
    experts). ``compile_blocks`` stacks them: only compiled does stacking the weights cost nothing
    (it fuses into autocast's cast)."""
    for module in model.modules():
        if isinstance(module, (SwiGLU, *ATTENTION_TYPES)):
            module.stacked = True


def fuse_loss(model: Transformer, sharded: bool = False) -> None:
    """Head and cross-entropy fused by chunks of tokens (``components.loss``): the training loss
    without the logits. It reads the head's weight directly, which a sharding wrapper splits."""
    require(not sharded, "trainer.fused_loss", True, "false or auto under FSDP or DeepSpeed")
    model.loss_chunk = chunk_for(model.cfg.vocab_size)


def pin_attention_kernel(model: Transformer, kernel: str, device: torch.device) -> None:
    """Run every causal attention of ``model`` on one SDPA kernel. SDPA's own pick is a fixed
    priority by GPU (cuDNN first on an H200 under torch 2.11), not the fastest for every GPU and
    shape: ``bench/throughput.py --layers`` times each."""
    allowed = ", ".join(ATTENTION_KERNELS)
    require(kernel in ATTENTION_KERNELS, "trainer.attention_kernel", kernel, allowed)
    if kernel == "auto":
        return
    on_cpu = ("flash", "math")  # the kernels SDPA has on a CPU
    require(device.type == "cuda" or kernel in on_cpu, "trainer.attention_kernel", kernel,
            f"{', '.join(('auto', *on_cpu))} on {device.type} (the others need a CUDA GPU)")  # fmt: skip
    for module in model.modules():
        if isinstance(module, ATTENTION_TYPES):
            module.sdpa_kernel = ATTENTION_KERNELS[kernel]
