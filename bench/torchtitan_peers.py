"""torchtitan's own models as the peers of ``bench.throughput``: DeepSeekV3Model for the MoE pair and
its Llama 3 for the dense pair, the same shape and weight count as ours, compiled as torchtitan's
trainer compiles them (``apply_compile``: each block with ``fullgraph=True``, MoE layers around
their experts, whose grouped GEMMs compile on their own).

torchtitan 0.2.2, not 0.3: 0.3's models import ``torch.distributed.fsdp.DataParallelMeshDims``,
which torch 2.11 (the GPU image's) does not have; 0.2.2's import only what 2.11 has. Its wheels
(pure Python) travel to a GPU machine like the others:

    pip download --no-deps --only-binary=:all: -d .whl torchtitan==0.2.2 torchdata tyro \\
        docstring-parser typeguard
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn


def missing(pair: str, device: torch.device) -> str | None:
    """Why torchtitan's peer of ``pair`` cannot run here, or None."""
    if pair == "moe" and device.type != "cuda":
        return "torchtitan's DeepSeekV3 skipped: its router counts with torch.histc, CUDA-only for int64"
    try:
        for module in ("torchtitan.models.deepseek_v3.model.model", "torchtitan.models.llama3.model.model"):
            importlib.import_module(module)
    except Exception as e:  # ImportError, or an API this torch lacks
        return f"torchtitan's peers skipped: {type(e).__name__}: {e}"
    return None


def build(pair: str, s, device: torch.device) -> nn.Module:
    """torchtitan's model of ``pair`` ("moe" or "dense") at ``s`` (a ``bench.throughput.Shape``)."""
    if pair == "moe":
        from torchtitan.models.deepseek_v3.model.args import DeepSeekV3ModelArgs
        from torchtitan.models.deepseek_v3.model.model import DeepSeekV3Model
        from torchtitan.models.moe import MoEArgs

        head = s.d_model // s.n_heads  # as bench.throughput.moe_config shapes the transformers peer
        moe = MoEArgs(num_experts=s.n_experts, num_shared_experts=1, top_k=s.top_k, score_func="sigmoid",
                      route_norm=True, route_scale=1.0, load_balance_coeff=1e-3,
                      use_grouped_mm=device.type == "cuda")  # fmt: skip
        args = DeepSeekV3ModelArgs(
            vocab_size=s.vocab, dim=s.d_model, inter_dim=s.ffn_hidden, moe_inter_dim=s.expert_dim,
            n_layers=s.n_layers, n_dense_layers=1, n_heads=s.n_heads, q_lora_rank=s.d_model // 2,
            kv_lora_rank=s.d_model // 4, qk_nope_head_dim=head, qk_rope_head_dim=head // 2, v_head_dim=head,
            max_seq_len=s.seq, original_seq_len=s.seq, norm_eps=1e-6, moe_args=moe,
        )  # fmt: skip
        args.moe_impl = "standard"  # what its trainer sets from the config without expert parallelism
        model = DeepSeekV3Model(args)
    else:
        from torchtitan.models.llama3.model.args import TransformerModelArgs
        from torchtitan.models.llama3.model.model import Transformer

        # Its SwiGLU width is a multiple of multiple_of at or above the scaled 8/3 d: ours exactly.
        scale = s.ffn_hidden / int(8 * s.d_model / 3)
        args = TransformerModelArgs(
            dim=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads, n_kv_heads=s.n_heads, vocab_size=s.vocab,
            multiple_of=s.ffn_hidden, ffn_dim_multiplier=scale, max_seq_len=s.seq, norm_eps=1e-6,
        )  # fmt: skip
        model = Transformer(args)
    with torch.no_grad():  # as its trainer initialises
        model.init_weights()
    return model


def compile_as_torchtitan(pair: str, model: nn.Module) -> nn.Module:
    """torchtitan's own ``apply_compile`` for the model (in place)."""
    from torchtitan.config.job_config import Compile

    config = Compile(enable=True, backend="inductor")
    if pair == "moe":
        from torchtitan.models.llama4.infra.parallelize import apply_compile

        apply_compile(model, config, ep_enabled=False)
    else:
        from torchtitan.models.llama3.infra.parallelize import apply_compile

        apply_compile(model, config)
    return model


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """torchtitan's loss: the logits [B, T, V] in fp32 against the targets [B, T]."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


# Its trainer compiles the loss too (job_config.Compile.components: model and loss).
compiled_cross_entropy = torch.compile(cross_entropy)


def loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return compiled_cross_entropy(model(batch[:, :-1]), batch[:, 1:])
