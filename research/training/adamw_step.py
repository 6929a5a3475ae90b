"""One AdamW step on a bf16 weight through its fp32 master: its scalars and its reference
implementation, which the Triton kernel (``adamw_triton``) matches."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepScalars:
    """A parameter group's scalars for AdamW step ``t``, in the form the update uses them."""

    decay: float  # 1 - lr * weight_decay
    beta1: float
    beta2: float
    eps: float
    step_size: float  # lr / (1 - beta1^t)
    bc2_sqrt: float  # sqrt(1 - beta2^t)

    @classmethod
    def of(cls, group: dict, t: float) -> StepScalars:
        lr, (beta1, beta2) = float(group["lr"]), group["betas"]
        return cls(1 - lr * group["weight_decay"], beta1, beta2, group["eps"], lr / (1 - beta1**t),
                   math.sqrt(1 - beta2**t))  # fmt: skip


def adamw_master_update_reference(
    p: torch.Tensor,
    master: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad_scale: torch.Tensor | None,
    s: StepScalars,
) -> None:
    """One AdamW step on the fp32 ``master`` from the low-precision ``grad`` (times ``grad_scale``
    where given), written back to ``p``, in torch ops: the CPU path, and the Triton kernel's
    reference."""
    grad = grad.to(master.dtype) if grad_scale is None else grad.to(master.dtype) * grad_scale
    master.mul_(s.decay)
    exp_avg.lerp_(grad, 1 - s.beta1)
    exp_avg_sq.mul_(s.beta2).addcmul_(grad, grad, value=1 - s.beta2)
    master.addcdiv_(exp_avg, (exp_avg_sq.sqrt() / s.bc2_sqrt).add_(s.eps), value=-s.step_size)
    p.copy_(master)
