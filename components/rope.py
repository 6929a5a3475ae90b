"""Rotary position embedding (RoPE), half-split layout.

The rotated vector is split into halves ``(x1, x2)`` and pair ``j`` is ``(x1[j], x2[j])``.
Checkpoints that interleave pairs as ``(x[2j], x[2j+1])`` (DeepSeek's release) map onto this
layout by permuting the rope rows of their projection weights once at load time.
"""

from __future__ import annotations

import torch
from torch import nn

from components.registry import require


class RotaryEmbedding(nn.Module):
    """cos/sin of every position up to ``max_positions``, computed once: a compiled block that
    computed them from the positions would have them inlined into each element of q and k, two
    transcendental calls per element, forward and backward. ``reserve`` lengthens the tables."""

    def __init__(self, dim: int, theta: float = 10000.0, max_positions: int = 4096):
        super().__init__()
        require(dim > 0 and dim % 2 == 0, "rope dim", dim, "a positive even number")
        require(theta > 0, "rope_theta", theta, "a positive number")
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_table", torch.empty(0, dim // 2), persistent=False)
        self.register_buffer("sin_table", torch.empty(0, dim // 2), persistent=False)
        self.reserve(max_positions)

    @torch.no_grad()
    def reserve(self, n_positions: int) -> None:
        """Make the tables cover positions 0..n_positions-1 (doubling, so that a long decode
        rebuilds them a few times only). Call it outside compiled code, before positions grow."""
        if n_positions <= self.cos_table.shape[0]:
            return
        n = max(n_positions, 2 * self.cos_table.shape[0])
        angles = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)[:, None] * self.inv_freq
        self.cos_table, self.sin_table = angles.cos(), angles.sin()

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin tables of shape [T, dim/2] (fp32) for integer ``positions`` [T], each below the
        reserved length."""
        return self.cos_table[positions], self.sin_table[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim of ``x`` [..., T, D] by cos/sin [T, D/2]; computed in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)
