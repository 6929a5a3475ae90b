"""The one place that makes the projection matrices of the model.

Every ``nn.Linear`` that a precision recipe may later replace (attention projections, dense FFN
matrices, MTP projections) is created through a ``LinearFactory``. Components take the factory as
an argument, so swapping the recipe is a change at the model's top, not in every component.
Embedding, output head, norms and the MoE router stay out of it on purpose: DeepSeek-V3 keeps them
in high precision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

LinearFactory = Callable[[int, int], nn.Module]


def make_linear(in_features: int, out_features: int) -> nn.Module:
    """The default projection: a bias-free ``nn.Linear`` (DeepSeek-V3 uses no biases)."""
    return nn.Linear(in_features, out_features, bias=False)


def project(x: torch.Tensor, layers: Sequence[nn.Module], stacked: bool) -> list[torch.Tensor]:
    """``x`` through each of ``layers``. ``stacked``: as one GEMM over their stacked weights when all
    are plain bias-free ``nn.Linear`` (a recipe's own layers, e.g. FP8, always run one by one): one
    wider GEMM that fills the GPU better than several narrow ones, and in the backward one GEMM for
    dx instead of one per layer and their sum. Only where each layer's weight is whole in memory
    (not under FSDP or DeepSpeed's sharding), and best compiled, where stacking the weights fuses
    into the cast autocast does anyway."""
    if stacked and all(type(layer) is nn.Linear and layer.bias is None for layer in layers):
        y = F.linear(x, torch.cat([layer.weight for layer in layers]))
        return list(y.split([layer.out_features for layer in layers], dim=-1))
    return [layer(x) for layer in layers]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: autocast's where it is on, else x's own (for code that
    casts its operands itself, as grouped GEMMs and the fused loss do)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
