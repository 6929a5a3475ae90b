"""Multi-token prediction (DeepSeek-V3): D sequential modules that each predict one token further.

Module k combines the previous depth's hidden state at position i with the embedding of token
i+k, runs one transformer block, and the model's shared output head predicts token i+k+1:

    h_k = Block(W_k [RMSNorm(h_{k-1}); RMSNorm(Emb(t_{i+k}))])

The chain is sequential (depth k sees depth k-1), which keeps the causal chain of each prediction
complete. The embedding and the output head belong to the model and are shared.
"""

from __future__ import annotations

import torch
from torch import nn

from components.linear import LinearFactory
from components.registry import require


def check_mtp(depth: int, weight: float) -> None:
    require(isinstance(depth, int) and depth >= 0, "mtp.depth", depth, "an integer >= 0 (0 = plain LM)")
    require(weight >= 0, "mtp.weight", weight, "a non-negative number (lambda)")


class MTPModule(nn.Module):
    def __init__(self, d_model: int, block: nn.Module, norm_eps: float, linear: LinearFactory):
        super().__init__()
        self.hidden_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.embed_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.proj = linear(2 * d_model, d_model)
        self.block = block
        # Each depth normalises its own output before the shared head, as DeepSeek-V3's release does.
        self.out_norm = nn.RMSNorm(d_model, eps=norm_eps)

    def forward(
        self, h_prev: torch.Tensor, emb_next: torch.Tensor, positions: torch.Tensor, cache: dict | None = None
    ) -> torch.Tensor:
        """h_prev, emb_next [B, T, C] -> this depth's hidden state [B, T, C] (before ``out_norm``);
        ``cache`` is its block's decoding cache, when it drafts tokens."""
        x = self.proj(torch.cat((self.hidden_norm(h_prev), self.embed_norm(emb_next)), dim=-1))
        return self.block(x, positions, cache)
