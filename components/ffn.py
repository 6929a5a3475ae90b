"""Feed-forward networks: the dense SwiGLU (also the body of every MoE expert)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.linear import LinearFactory, project
from components.registry import Registry, require

FFN = Registry("ffn")


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden_dim: int, linear: LinearFactory):
        super().__init__()
        self.w_gate = linear(d_model, hidden_dim)
        self.w_up = linear(d_model, hidden_dim)
        self.w_down = linear(hidden_dim, d_model)
        self.stacked = False  # gate and up as one GEMM (components.linear.project)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.w_gate, self.w_up), self.stacked)
        return self.w_down(F.silu(gate) * up)


def default_hidden_dim(d_model: int, multiple_of: int = 64) -> int:
    """LLaMA's sizing: 2/3 of 4*d_model (so SwiGLU costs what a 4x GELU MLP does), rounded up."""
    hidden = int(8 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@FFN.register("dense")
def build_dense(d_model: int, linear: LinearFactory, hidden_dim: int | None = None) -> SwiGLU:
    hidden_dim = default_hidden_dim(d_model) if hidden_dim is None else hidden_dim
    require(hidden_dim >= 1, "ffn.hidden_dim", hidden_dim, "a positive integer")
    return SwiGLU(d_model, hidden_dim, linear)
