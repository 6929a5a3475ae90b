"""The speed options of a training run, which leave its numerics alone, as named converters applied
in one ordered place (``convert``): ``trainer.fused_loss``, ``trainer.attention_kernel`` (the SDPA
kernel of causal attention; ``auto``: SDPA's own pick), ``trainer.bf16_expert_weights``,
``trainer.cuda_graphs`` and ``trainer.compile``, each ``auto``, ``true`` or ``false``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.attention import SDPBackend

from components.attention import Attention
from components.ffn import SwiGLU
from components.loss import chunk_for, cross_entropy_chunk
from components.moe import GroupedExperts
from components.registry import require, spec_error
from research.model.transformer import Transformer
from research.training.preflight import deterministic

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
    autocast (``research.training.optim``: what this saves). Returns each weight's fp32 tensor: its master
    for ``research.training.optim.MasterAdamW``, which the weight must be trained with."""
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
    host CPU slower than its GPU at launching them leaves the GPU waiting (``bench/throughput.py``
    measures what it saves). Each step must then begin with
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
        if isinstance(module, (SwiGLU, Attention)):
            module.stacked = True


def fuse_loss(model: Transformer, sharded: bool = False) -> None:
    """Head and cross-entropy fused by chunks of tokens (``components.loss``): the training loss
    without the logits. It reads the head's weight directly, which a sharding wrapper splits."""
    require(not sharded, "trainer.fused_loss", True, "false or auto under FSDP or DeepSpeed")
    model.loss_chunk = chunk_for(model.cfg.vocab_size)


def pin_attention_kernel(model: Transformer, kernel: str, device: torch.device) -> None:
    """Run every causal attention of ``model`` on one SDPA kernel. SDPA's own pick is a fixed
    priority by GPU, not the fastest for every GPU and
    shape: ``bench/throughput.py --layers`` times each."""
    allowed = ", ".join(ATTENTION_KERNELS)
    require(kernel in ATTENTION_KERNELS, "trainer.attention_kernel", kernel, allowed)
    if kernel == "auto":
        return
    on_cpu = ("flash", "math")  # the kernels SDPA has on a CPU
    require(device.type == "cuda" or kernel in on_cpu, "trainer.attention_kernel", kernel,
            f"{', '.join(('auto', *on_cpu))} on {device.type} (the others need a CUDA GPU)")  # fmt: skip
    for module in model.modules():
        if isinstance(module, Attention):
            module.sdpa_kernel = ATTENTION_KERNELS[kernel]


# --- the converters, in the order they apply -----------------------------------------------------

# Every option off: what a model built outside a run (a test, a benchmark's reference) trains as.
# A run's options come from its config (trainer/default.yaml states their defaults, auto).
PLAIN: dict[str, Any] = {"compile": False, "cuda_graphs": False, "fused_loss": False,
                         "bf16_expert_weights": False, "attention_kernel": "auto"}  # fmt: skip


def options_of(t: DictConfig) -> dict[str, Any]:
    """The converters' options of a run's ``trainer`` config. ``auto`` leaves compiling off in a
    deterministic run: its kernels' determinism is not verified."""
    options = {key: t[key] for key in PLAIN}
    if options["compile"] == "auto" and deterministic(t) is True:
        options["compile"] = False
    return options


@dataclass(frozen=True)
class Target:
    """Where the model will train: what ``auto`` and each option's conditions depend on."""

    device: torch.device
    sharded: bool = False  # FSDP or DeepSpeed own the parameters
    distributed: bool = False  # more than one process
    precision: str = "bf16-mixed"  # Lightning's precision name
    accumulate: int = 1  # gradient accumulation steps


@dataclass
class Converted:
    """What the converters did, for the trainer to honour."""

    applied: list[str] = field(default_factory=list)
    masters: dict[nn.Parameter, torch.Tensor] = field(default_factory=dict)  # weights stored in bf16
    cuda_graphs: bool = False  # each step must begin with cudagraph_mark_step_begin()


class Converter:
    """One option that transforms a model in place (torchtitan's ``ModelConverter``): ``enabled``
    decides from the options and the target, and raises on a setting the target cannot take."""

    name: str

    def enabled(self, options: dict[str, Any], target: Target, model: Transformer) -> bool:
        raise NotImplementedError

    def apply(self, model: Transformer, options: dict[str, Any], target: Target, out: Converted) -> None:
        raise NotImplementedError


class FusedLoss(Converter):
    name = "fused_loss"

    def enabled(self, options: dict[str, Any], target: Target, model: Transformer) -> bool:
        return enabled(self.name, options[self.name], target.device, target.sharded)

    def apply(self, model: Transformer, options: dict[str, Any], target: Target, out: Converted) -> None:
        fuse_loss(model, target.sharded)


class AttentionKernel(Converter):
    name = "attention_kernel"

    def enabled(self, options: dict[str, Any], target: Target, model: Transformer) -> bool:
        return options[self.name] != "auto"

    def apply(self, model: Transformer, options: dict[str, Any], target: Target, out: Converted) -> None:
        pin_attention_kernel(model, options[self.name], target.device)


class BF16ExpertWeights(Converter):
    name = "bf16_expert_weights"

    def enabled(self, options: dict[str, Any], target: Target, model: Transformer) -> bool:
        single = not target.distributed and not target.sharded
        return bf16_expert_weights_enabled(options[self.name], target.device, model, target.precision, single,
                                           target.accumulate)  # fmt: skip

    def apply(self, model: Transformer, options: dict[str, Any], target: Target, out: Converted) -> None:
        out.masters = store_experts_in_bf16(model)


class CudaGraphs(Converter):
    """Decided before ``Compile``, which compiles the blocks to replay as graphs when this is on."""

    name = "cuda_graphs"

    def enabled(self, options: dict[str, Any], target: Target, model: Transformer) -> bool:
        compiled = enabled("compile", options["compile"], target.device, target.sharded)
        return cuda_graphs_enabled(options[self.name], target.device, compiled, target.distributed)

    def apply(self, model: Transformer, options: dict[str, Any], target: Target, out: Converted) -> None:
        out.cuda_graphs = True


class Compile(Converter):
    """Last: it compiles what the others left (the fused loss's chunk function, bf16 weights)."""

    name = "compile"

    def enabled(self, options: dict[str, Any], target: Target, model: Transformer) -> bool:
        return enabled(self.name, options[self.name], target.device, target.sharded)

    def apply(self, model: Transformer, options: dict[str, Any], target: Target, out: Converted) -> None:
        compile_blocks(model, cuda_graphs=out.cuda_graphs, stacked=not target.sharded)


CONVERTERS: tuple[Converter, ...] = (
    FusedLoss(),
    AttentionKernel(),
    BF16ExpertWeights(),
    CudaGraphs(),
    Compile(),
)


def convert(model: Transformer, options: dict[str, Any], target: Target) -> Converted:
    """Apply every enabled converter to ``model``, in ``CONVERTERS``' order: the one place they
    are applied, for training (``LitLM.configure_model``) and the benchmarks alike."""
    unknown = sorted(set(options) - set(PLAIN))
    if unknown:
        raise spec_error(f"trainer.{unknown[0]}", options[unknown[0]], f"speed options: {', '.join(PLAIN)}")
    options = {**PLAIN, **options}
    out = Converted()
    for converter in CONVERTERS:
        if converter.enabled(options, target, model):
            converter.apply(model, options, target, out)
            out.applied.append(converter.name)
    return out
