"""Slow, obviously-correct references the vectorised code is checked against (tests only)."""

import torch
import torch.nn.functional as F

from components.moe import MoE


def moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """DeepSeekMoE output by a loop over experts, from the same router decisions."""
    B, T, C = x.shape
    x_flat = x.reshape(-1, C)
    _, topk_idx, weights = moe.router(x_flat)
    H = moe.experts.w_down.shape[1]
    y = torch.zeros_like(x_flat)
    for e in range(moe.experts.w_gate_up.shape[0]):
        token, slot = (topk_idx == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        w_gate, w_up = moe.experts.w_gate_up[e, :, :H], moe.experts.w_gate_up[e, :, H:]
        out = (F.silu(x_flat[token] @ w_gate) * (x_flat[token] @ w_up)) @ moe.experts.w_down[e]
        y[token] += weights[token, slot, None] * out
    if moe.shared is not None:
        y = y + moe.shared(x_flat)
    return y.view(B, T, C)
