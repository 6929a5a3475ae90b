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
    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        require(dim > 0 and dim % 2 == 0, "rope dim", dim, "a positive even number")
        require(theta > 0, "rope_theta", theta, "a positive number")
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin tables of shape [T, dim/2] (fp32) for integer ``positions`` [T]."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim of ``x`` [..., T, D] by cos/sin [T, D/2]; computed in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)
