"""A DeepSeek-V3-style decoder assembled from ``components`` by name.

    tokens -> embedding -> n_layers x Block(attention, ffn) -> RMSNorm -> head -> logits
                                      `-> MTP depth 1 -> ... -> depth D (training; drafts when decoding)

Each axis (attention, ffn, balance, mtp) is a spec mapping picked from a registry, so every
ablation is a config change. The model also reports what the platform measures: parameters,
parameters active per token, training FLOPs per token (for MFU) and KV-cache bytes per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from components.attention import ATTENTION, Attention, KVCache
from components.balance import BalancePolicy, build_balance
from components.ffn import FFN
from components.linear import LinearFactory, make_linear
from components.loss import cross_entropy_chunk, linear_cross_entropy
from components.moe import MoE
from components.mtp import MTPModule, check_mtp
from components.registry import require
from components.rope import RotaryEmbedding


@dataclass
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    attention: dict[str, Any] = field(default_factory=lambda: {"name": "mha", "n_heads": 4})
    ffn: dict[str, Any] = field(default_factory=lambda: {"name": "dense"})
    balance: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    mtp: dict[str, Any] = field(default_factory=lambda: {"depth": 0, "weight": 0.3})
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = False


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V] from the main head (None when the loss is fused)
    loss: torch.Tensor | None = None  # lm_loss + mtp.weight * mtp_loss + balance_loss
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None  # mean over depths of each depth's cross-entropy
    balance_loss: torch.Tensor | None = None  # summed over MoE layers (training only)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, d_model: int, attn: nn.Module, ffn: nn.Module, norm_eps: float):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.attn = attn
        self.ffn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.ffn = ffn

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions, cache)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, linear: LinearFactory = make_linear):
        super().__init__()
        for key in ("vocab_size", "d_model", "n_layers"):
            require(getattr(cfg, key) >= 1, key, getattr(cfg, key), "a positive integer")
        require(cfg.init_std > 0, "init_std", cfg.init_std, "a positive number")
        self.cfg = cfg
        self.mtp_depth, self.mtp_weight = cfg.mtp.get("depth", 0), cfg.mtp.get("weight", 0.3)
        unknown = set(cfg.mtp) - {"depth", "weight"}
        require(not unknown, "mtp", sorted(unknown), "keys depth, weight")
        check_mtp(self.mtp_depth, self.mtp_weight)
        balance = build_balance(cfg.balance)
        self.first_k_dense = cfg.ffn.get("first_k_dense", 0) if cfg.ffn.get("name") == "moe" else 0
        require(
            0 <= self.first_k_dense <= cfg.n_layers,
            "ffn.first_k_dense",
            self.first_k_dense,
            f"0..n_layers={cfg.n_layers}",
        )

        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(self._block(i, balance, linear) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # MTP blocks take the FFN of the deepest layer (MoE in a MoE model, as in DeepSeek-V3).
        self.mtp = nn.ModuleList(
            MTPModule(cfg.d_model, self._block(cfg.n_layers, balance, linear), cfg.norm_eps, linear)
            for _ in range(self.mtp_depth)
        )
        self.ropes = [m for m in self.modules() if isinstance(m, RotaryEmbedding)]
        self.init_weights()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        # Tokens per chunk of the fused head + cross-entropy (components.loss); 0 computes the
        # logits whole and returns them; loss_chunk_fn does a chunk's softmax and gradient (compiled
        # with the blocks). Speed settings, not the model's maths: the trainer sets them.
        self.loss_chunk, self.loss_chunk_fn = 0, cross_entropy_chunk

    def _block(self, layer: int, balance: BalancePolicy, linear: LinearFactory) -> Block:
        ffn_spec = self.cfg.ffn
        if layer < self.first_k_dense:
            ffn_spec = {"name": "dense", "hidden_dim": ffn_spec.get("dense_hidden_dim")}
        d = self.cfg.d_model
        attn = ATTENTION.build(self.cfg.attention, d_model=d, linear=linear)
        ffn = FFN.build(ffn_spec, d_model=d, linear=linear, balance=balance)
        return Block(d, attn, ffn, self.cfg.norm_eps)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for every matrix (projections, experts, router, embedding, head);
        norms start at one and the routing bias at zero."""
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=self.cfg.init_std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        """idx [B, T] token ids; targets [B, T] the next tokens (-100 ignored)."""
        T = idx.shape[1]
        self.reserve_positions(T)
        positions = torch.arange(T, device=idx.device)
        h = self.trunk(idx, positions)
        if targets is None:
            return ModelOutput(self.logits(h))

        logits, lm_loss = self._head_loss(self.norm(h), targets)
        loss = lm_loss
        mtp_loss = balance_loss = None
        if self.mtp_depth > 0:
            mtp_loss = self._mtp_loss(h, idx, targets, positions)
            loss = loss + self.mtp_weight * mtp_loss
        losses = [m.balance_loss for m in self.moe_layers() if m.balance_loss is not None]
        if losses:
            balance_loss = torch.stack(losses).sum()
            loss = loss + balance_loss
        return ModelOutput(logits, loss, lm_loss, mtp_loss, balance_loss)

    def trunk(
        self, idx: torch.Tensor, positions: torch.Tensor, cache: list[KVCache] | None = None
    ) -> torch.Tensor:
        """The last block's output h [B, T, C] (before the final norm), what the head and MTP read.
        With ``cache`` (``new_cache``), positions are per row, [B, T], and below ``reserve_positions``."""
        h = self.embed(idx)
        for i, block in enumerate(self.blocks):
            h = block(h, positions, None if cache is None else cache[i])
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The main head's logits [..., V] of trunk states h [..., C]."""
        return self.head(self.norm(h))

    def reserve_positions(self, n: int) -> None:
        """Rope tables for positions 0..n-1 (decoding calls it once, outside compiled code)."""
        for rope in self.ropes:
            rope.reserve(n)

    def _mtp_loss(
        self, h: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Depth k at position i sees token i+k and predicts token i+k+1 (= targets[i+k])."""
        T = idx.shape[1]
        require(self.mtp_depth < T, "sequence length", T, f"more than mtp.depth={self.mtp_depth} tokens")
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            h = module(h[:, : T - k], self.embed(idx[:, k:]), positions[: T - k])
            losses.append(self._head_loss(module.out_norm(h), targets[:, k:])[1])
        return torch.stack(losses).mean()

    def _head_loss(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(logits or None, mean cross-entropy) of the normalised states h [B, T, C]."""
        if self.loss_chunk:
            return None, linear_cross_entropy(
                h.flatten(0, 1), self.head.weight, targets.flatten(), self.loss_chunk, self.loss_chunk_fn
            )
        logits = self.head(h)
        return logits, _cross_entropy(logits, targets)

    # --- what the platform measures -----------------------------------------------------------

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def update_balance_bias(self) -> None:
        """The aux-free step for every MoE layer; call once after each optimiser step."""
        for m in self.moe_layers():
            m.update_bias()

    def new_cache(
        self, batch: int, max_len: int, dtype: torch.dtype | None = None, mtp: bool = False
    ) -> list[KVCache]:
        """The decoding cache of every layer, ``max_len`` positions of ``batch`` rows allocated
        once (in the weights' dtype unless given); with ``mtp``, then one per MTP depth."""
        weight = self.embed.weight
        blocks = [*self.blocks, *(m.block for m in self.mtp)] if mtp else self.blocks
        return [b.attn.new_cache(batch, max_len, dtype or weight.dtype, weight.device) for b in blocks]

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Decoding cache per token, summed over layers (MTP modules are not used for decoding)."""
        return sum(b.attn.kv_cache_bytes_per_token(bytes_per_value) for b in self.blocks)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Parameters that touch one token: all but the routed experts it is not sent to."""
        return self.num_params() - sum(_inactive_expert_params(m) for m in self.moe_layers())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward) for MFU.

        Matmuls: 2 FLOPs per active weight per token forward (the embedding lookup is free; the
        head runs once for the main model and once per MTP depth). Attention core: scores and
        weighted values over the causal half of the context, 2 * H * (d_qk + d_v) * seq_len / 2.
        """
        matmul = sum(p.numel() for p in self.parameters() if p.dim() >= 2)
        matmul -= sum(_inactive_expert_params(m) for m in self.moe_layers())
        if not self.cfg.tie_embeddings:
            matmul -= self.embed.weight.numel()
        matmul += self.mtp_depth * self.head.weight.numel()
        attn = sum(
            a.n_heads * (a.qk_head_dim + a.v_head_dim) * seq_len
            for a in self.modules()
            if isinstance(a, Attention)
        )
        return 3 * (2 * matmul + attn)


def _inactive_expert_params(moe: MoE) -> int:
    w = moe.experts
    n_experts = w.w_gate_up.shape[0]
    per_expert = (w.w_gate_up.numel() + w.w_down.numel()) // n_experts
    return (n_experts - moe.router.top_k) * per_expert


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
